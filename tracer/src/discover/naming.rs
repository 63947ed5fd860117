//! service.name for a process: an explicit override, gunicorn's proc name or app module,
//! a Python script or module, or the executable name.

use std::path::Path;

use super::procfs::ProcFacts;

/// A `--service-name SELECTOR=NAME` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameRule {
    Pid(u32, String),
    Comm(String, String),
    Exe(String, String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad --service-name {0:?}: expected pid:N=NAME, comm:COMM=NAME or exe:PATH=NAME")]
pub struct BadNameRule(pub String);

impl std::str::FromStr for NameRule {
    type Err = BadNameRule;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadNameRule(s.to_string());
        let (selector, name) = s.rsplit_once('=').ok_or_else(bad)?;
        if name.is_empty() {
            return Err(bad());
        }
        let name = name.to_string();
        match selector.split_once(':').ok_or_else(bad)? {
            ("pid", pid) => Ok(Self::Pid(pid.parse().map_err(|_| bad())?, name)),
            ("comm", comm) if !comm.is_empty() => Ok(Self::Comm(comm.to_string(), name)),
            ("exe", exe) if !exe.is_empty() => Ok(Self::Exe(exe.to_string(), name)),
            _ => Err(bad()),
        }
    }
}

/// The name a `--service-name` rule gives the process, if one matches.
pub fn by_rule(facts: &ProcFacts, rules: &[NameRule]) -> Option<String> {
    rules.iter().find_map(|rule| match rule {
        NameRule::Pid(pid, name) if *pid == facts.tgid || *pid == facts.ppid => Some(name.clone()),
        NameRule::Comm(comm, name) if *comm == facts.comm => Some(name.clone()),
        NameRule::Exe(exe, name) if exe_matches(facts.exe.as_deref(), exe) => Some(name.clone()),
        _ => None,
    })
}

/// The service name of a process.
pub fn service_name(facts: &ProcFacts, rules: &[NameRule]) -> String {
    if let Some(name) = by_rule(facts, rules) {
        return name;
    }
    if let Some(name) = gunicorn_name(&facts.cmdline) {
        return name;
    }
    if let Some(name) = python_name(facts) {
        return name;
    }
    facts
        .exe
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| facts.comm.clone())
}

/// True when `pattern` is the full path of `exe` or its file name.
pub fn exe_matches(exe: Option<&Path>, pattern: &str) -> bool {
    let Some(exe) = exe else { return false };
    if Path::new(pattern).is_absolute() {
        exe == Path::new(pattern)
    } else {
        exe.file_name().is_some_and(|n| n == pattern)
    }
}

fn basename(arg: &str) -> &str {
    arg.rsplit('/').next().unwrap_or(arg)
}

/// gunicorn: `--name`/`-n` (its proc_name), else the module of the `module:variable` app.
fn gunicorn_name(cmdline: &[String]) -> Option<String> {
    // setproctitle-style titles: "gunicorn: worker [app:app]".
    if let Some(first) = cmdline.first()
        && let Some(title) = first.strip_prefix("gunicorn: ")
    {
        let inner = title.split_once('[')?.1.split_once(']')?.0;
        return Some(app_module(inner));
    }
    let start = cmdline
        .iter()
        .take(3)
        .position(|a| basename(a) == "gunicorn")?;
    let args = cmdline.get(start + 1..)?;
    let mut app_with_colon = None;
    let mut last_positional = None;
    let mut i = 0;
    while let Some(arg) = args.get(i) {
        if let Some(v) = arg.strip_prefix("--name=") {
            return Some(v.to_string());
        }
        if arg == "--name" || arg == "-n" {
            return args.get(i + 1).cloned();
        }
        if let Some(v) = arg.strip_prefix("-n")
            && !v.is_empty()
        {
            return Some(v.to_string());
        }
        if !arg.starts_with('-') && !follows_valued_option(args.get(i.wrapping_sub(1))) {
            // The app is the positional argument; `module:variable` wins over a bare word
            // because a flag unknown to us may still have swallowed one.
            if arg.contains(':') {
                app_with_colon = Some(app_module(arg));
            } else {
                last_positional = Some(app_module(arg));
            }
        }
        i += 1;
    }
    app_with_colon.or(last_positional)
}

/// True when `prev` is a gunicorn option whose value is the next argument.
fn follows_valued_option(prev: Option<&String>) -> bool {
    const VALUED: &[&str] = &[
        "-b",
        "--bind",
        "-w",
        "--workers",
        "-k",
        "--worker-class",
        "-t",
        "--timeout",
        "--threads",
        "-c",
        "--config",
        "--max-requests",
        "--max-requests-jitter",
        "--graceful-timeout",
        "--keep-alive",
        "--log-level",
        "--access-logfile",
        "--error-logfile",
        "--log-file",
        "--access-logformat",
        "--log-config",
        "-u",
        "--user",
        "-g",
        "--group",
        "-p",
        "--pid",
        "--chdir",
        "--backlog",
        "-e",
        "--env",
        "--worker-connections",
        "--forwarded-allow-ips",
        "--pythonpath",
        "--umask",
        "--worker-tmp-dir",
        "--statsd-host",
        "--statsd-prefix",
        "--limit-request-line",
        "--limit-request-fields",
        "--limit-request-field_size",
        "--certfile",
        "--keyfile",
        "--ca-certs",
        "--paste",
        "--paste-global",
        "-m",
        "--control-socket",
    ];
    prev.is_some_and(|p| VALUED.contains(&p.as_str()))
}

fn app_module(spec: &str) -> String {
    spec.split(':').next().unwrap_or(spec).to_string()
}

/// `python -m module` -> module; `python script.py` -> script.
fn python_name(facts: &ProcFacts) -> Option<String> {
    let exe_name = facts
        .exe
        .as_deref()?
        .file_name()?
        .to_string_lossy()
        .into_owned();
    if !exe_name.starts_with("python") {
        return None;
    }
    let mut args = facts.cmdline.iter().skip(1);
    while let Some(arg) = args.next() {
        if arg == "-m" {
            return args.next().cloned();
        }
        if arg == "-c" {
            return None;
        }
        if arg.starts_with('-') {
            continue;
        }
        let script = basename(arg);
        return Some(script.strip_suffix(".py").unwrap_or(script).to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(cmd: &[&str], exe: &str) -> ProcFacts {
        ProcFacts {
            tgid: 10,
            ppid: 1,
            comm: "gunicorn".into(),
            exe: Some(exe.into()),
            cmdline: cmd.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn gunicorn_app_module_and_name() {
        let py = "/usr/bin/python3.11";
        let f = facts(
            &[
                "/venv/bin/python",
                "/venv/bin/gunicorn",
                "-w",
                "2",
                "--bind",
                "127.0.0.1:1",
                "app:app",
            ],
            py,
        );
        assert_eq!(service_name(&f, &[]), "app");
        let f = facts(
            &[
                "/venv/bin/python",
                "/venv/bin/gunicorn",
                "--name",
                "api",
                "app:app",
            ],
            py,
        );
        assert_eq!(service_name(&f, &[]), "api");
        let f = facts(&["gunicorn", "--workers=2", "api.wsgi:application"], py);
        assert_eq!(service_name(&f, &[]), "api.wsgi");
        let f = facts(
            &["/venv/bin/gunicorn", "--no-control-socket", "shop:app"],
            py,
        );
        assert_eq!(service_name(&f, &[]), "shop");
        let f = facts(&["/venv/bin/gunicorn", "--preload", "-w", "2", "shop"], py);
        assert_eq!(service_name(&f, &[]), "shop");
        let f = facts(
            &["/venv/bin/gunicorn", "app:app", "--bind", "0.0.0.0:5001"],
            py,
        );
        assert_eq!(service_name(&f, &[]), "app");
        let f = facts(&["gunicorn: worker [app:app]"], py);
        assert_eq!(service_name(&f, &[]), "app");
    }

    #[test]
    fn rules_win_and_fallbacks() {
        let f = facts(&["/venv/bin/gunicorn", "app:app"], "/usr/bin/python3");
        let rules = vec!["comm:gunicorn=api".parse::<NameRule>().unwrap()];
        assert_eq!(service_name(&f, &rules), "api");
        let f = facts(
            &["python3", "-m", "http.server", "8000"],
            "/usr/bin/python3.11",
        );
        assert_eq!(service_name(&f, &[]), "http.server");
        let f = facts(&["/srv/daemon", "-x"], "/srv/daemon");
        assert_eq!(service_name(&f, &[]), "daemon");
        assert!("pid:x=a".parse::<NameRule>().is_err());
        assert!("comm:a=".parse::<NameRule>().is_err());
        assert_eq!(
            "exe:/a/b=c".parse::<NameRule>(),
            Ok(NameRule::Exe("/a/b".into(), "c".into()))
        );
    }
}
