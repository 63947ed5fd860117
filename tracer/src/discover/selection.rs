//! The user's selection (--pid, --comm, --exe) applied to processes that already run; the
//! kernel keeps it current afterwards (fork inherits, exec matches comm).

use std::collections::{HashMap, HashSet};

use super::{naming::exe_matches, procfs::ProcFacts};

#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub exes: Vec<String>,
}

impl Selection {
    /// No selection at all means the whole host.
    pub fn is_everything(&self) -> bool {
        self.pids.is_empty() && self.comms.is_empty() && self.exes.is_empty()
    }

    /// Whether a process matches by itself (not through an ancestor).
    pub fn matches(&self, facts: &ProcFacts) -> bool {
        self.pids.contains(&facts.tgid)
            || self.comms.iter().any(|c| comm_matches(&facts.comm, c))
            || self
                .exes
                .iter()
                .any(|e| exe_matches(facts.exe.as_deref(), e))
    }

    /// The processes to watch among `procs`: the matching ones and all their descendants.
    pub fn select(&self, procs: &[ProcFacts]) -> HashSet<u32> {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for p in procs {
            children.entry(p.ppid).or_default().push(p.tgid);
        }
        let mut selected = HashSet::new();
        let mut stack: Vec<u32> = procs
            .iter()
            .filter(|p| self.matches(p))
            .map(|p| p.tgid)
            .collect();
        while let Some(tgid) = stack.pop() {
            if selected.insert(tgid)
                && let Some(kids) = children.get(&tgid)
            {
                stack.extend(kids.iter().copied());
            }
        }
        selected
    }
}

/// The kernel truncates comm to 15 bytes; compare the way the kernel would see the filter.
fn comm_matches(comm: &str, filter: &str) -> bool {
    let truncated = match filter.char_indices().nth(15) {
        Some((i, _)) => &filter[..i],
        None => filter,
    };
    comm == truncated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(tgid: u32, ppid: u32, comm: &str) -> ProcFacts {
        ProcFacts {
            tgid,
            ppid,
            comm: comm.into(),
            exe: Some(format!("/usr/bin/{comm}").into()),
            cmdline: vec![],
        }
    }

    #[test]
    fn descendants_follow_their_ancestor() {
        let procs = vec![
            p(1, 0, "init"),
            p(10, 1, "gunicorn"),
            p(11, 10, "gunicorn"),
            p(12, 11, "sh"),
            p(20, 1, "python3"),
        ];
        let sel = Selection {
            comms: vec!["gunicorn".into()],
            ..Default::default()
        };
        let got = sel.select(&procs);
        assert_eq!(got, HashSet::from([10, 11, 12]));
        let sel = Selection {
            pids: vec![20],
            ..Default::default()
        };
        assert_eq!(sel.select(&procs), HashSet::from([20]));
        let sel = Selection {
            exes: vec!["python3".into()],
            ..Default::default()
        };
        assert_eq!(sel.select(&procs), HashSet::from([20]));
        assert!(Selection::default().is_everything());
    }

    #[test]
    fn long_comm_filters_compare_truncated() {
        assert!(comm_matches("a-very-long-nam", "a-very-long-name-here"));
        assert!(!comm_matches("gunicorn", "gunicor"));
    }
}
