//! Recognises Dify plugin runtimes: the plugin daemon starts each local plugin as
//! `<workdir>/.venv/bin/python -m main` in `<root>/<author>/<name>-<version>@<checksum>`, with
//! the plugin's manifest.yaml there. Each runtime is its own service, named after the daemon
//! that runs it and the plugin it is.

use std::path::Path;

use super::procfs::ProcFacts;

/// Which plugin a process runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginIdentity {
    pub author: Option<String>,
    pub name: String,
    pub version: Option<String>,
}

impl PluginIdentity {
    /// `<daemon>_plugin_<name>_<version>` (version left out when unknown).
    pub fn service_name(&self, daemon_service: &str) -> String {
        match &self.version {
            Some(version) => format!("{daemon_service}_plugin_{}_{version}", self.name),
            None => format!("{daemon_service}_plugin_{}", self.name),
        }
    }

    /// `author/name`, Dify's plugin id, when the author is known.
    pub fn plugin_id(&self) -> Option<String> {
        self.author.as_ref().map(|a| format!("{a}/{}", self.name))
    }
}

/// Whether the command line is the daemon's plugin launch (`python -m main`).
pub fn is_plugin_launch(facts: &ProcFacts) -> bool {
    let python = facts
        .exe
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().starts_with("python"))
        .unwrap_or(false)
        || facts
            .cmdline
            .first()
            .is_some_and(|a| a.rsplit('/').next().unwrap_or(a).starts_with("python"));
    python
        && facts
            .cmdline
            .windows(2)
            .any(|w| w[0] == "-m" && w[1] == "main")
}

/// The plugin a process runs, from its working directory (manifest.yaml, else the directory
/// name the daemon gives it). None when the process is not a plugin launch.
pub fn identify(facts: &ProcFacts) -> Option<PluginIdentity> {
    if !is_plugin_launch(facts) {
        return None;
    }
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", facts.tgid)).ok()?;
    let from_dir = from_workdir(&cwd);
    let manifest = std::fs::read_to_string(cwd.join("manifest.yaml"))
        .ok()
        .map(|text| from_manifest(&text));
    match (manifest, from_dir) {
        (Some(m), dir) if !m.name.is_empty() => Some(PluginIdentity {
            author: m
                .author
                .or_else(|| dir.as_ref().and_then(|d| d.author.clone())),
            version: m.version.or_else(|| dir.and_then(|d| d.version)),
            name: m.name,
        }),
        (_, dir) => dir,
    }
}

/// Top-level `name:`, `version:` and `author:` of a plugin manifest. Only unindented keys
/// count (the manifest nests another `version` under `meta`).
pub fn from_manifest(text: &str) -> PluginIdentity {
    let mut out = PluginIdentity {
        author: None,
        name: String::new(),
        version: None,
    };
    for line in text.lines() {
        if line.starts_with([' ', '\t', '#', '-']) {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value
            .split(" #")
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches(|c| c == '"' || c == '\'')
            .to_string();
        if value.is_empty() {
            continue;
        }
        match key.trim() {
            "name" if out.name.is_empty() => out.name = value,
            "version" if out.version.is_none() => out.version = Some(value),
            "author" if out.author.is_none() => out.author = Some(value),
            _ => {}
        }
    }
    out
}

/// `<author>/<name>-<version>@<checksum>` as the daemon lays out working directories.
pub fn from_workdir(dir: &Path) -> Option<PluginIdentity> {
    let leaf = dir.file_name()?.to_str()?;
    let without_checksum = leaf.split('@').next().unwrap_or(leaf);
    let (name, version) = match without_checksum.rsplit_once('-') {
        Some((name, version)) if version.starts_with(|c: char| c.is_ascii_digit()) => {
            (name.to_string(), Some(version.to_string()))
        }
        _ => (without_checksum.to_string(), None),
    };
    if name.is_empty() {
        return None;
    }
    let author = dir
        .parent()
        .and_then(Path::file_name)
        .and_then(|a| a.to_str())
        .map(str::to_string);
    Some(PluginIdentity {
        author,
        name,
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_top_level_keys_only() {
        let m = from_manifest(
            "version: 0.0.3\ntype: plugin\nauthor: \"langgenius\"\nname: openai # the provider\nmeta:\n  version: 9.9.9\n  runner:\n    entrypoint: main\n",
        );
        assert_eq!(m.name, "openai");
        assert_eq!(m.version.as_deref(), Some("0.0.3"));
        assert_eq!(m.author.as_deref(), Some("langgenius"));
        assert_eq!(m.plugin_id().as_deref(), Some("langgenius/openai"));
        assert_eq!(m.service_name("daemon"), "daemon_plugin_openai_0.0.3");
    }

    #[test]
    fn workdir_layout() {
        let id =
            from_workdir(Path::new("/app/storage/cwd/langgenius/openai-0.2.1@4f1a9c")).unwrap();
        assert_eq!(id.name, "openai");
        assert_eq!(id.version.as_deref(), Some("0.2.1"));
        assert_eq!(id.author.as_deref(), Some("langgenius"));
        let id = from_workdir(Path::new("/x/my-tool")).unwrap();
        assert_eq!(id.name, "my-tool");
        assert_eq!(id.version, None);
    }

    #[test]
    fn launch_command() {
        let facts = |cmd: &[&str]| ProcFacts {
            tgid: 1,
            cmdline: cmd.iter().map(|s| s.to_string()).collect(),
            exe: Some("/usr/bin/python3.12".into()),
            ..Default::default()
        };
        assert!(is_plugin_launch(&facts(&[
            "/w/.venv/bin/python",
            "-m",
            "main"
        ])));
        assert!(!is_plugin_launch(&facts(&["python", "-m", "other"])));
        assert!(!is_plugin_launch(&facts(&["python", "main.py"])));
    }
}
