//! Test-only fault points at task step boundaries, for crash-safety tests.
//!
//! They exist only in builds with the `fault-injection` feature (the test rig's, through
//! `rig`); a release build has no way to arm them. There, they are off unless the agent is
//! started with `HVNODE_FAULT=<kind>:<step>:<before|after|undo>` (for example
//! `create:start_vm:after`; `undo` is just before the step is undone). When a task reaches
//! that boundary, the agent kills itself with SIGKILL — no destructor, flush or shutdown
//! handler runs, as in a real crash.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    Before,
    After,
    Undo,
}

#[derive(Debug, Clone, Default)]
pub struct FaultPoints {
    point: Option<(String, String, Moment)>,
}

impl FaultPoints {
    pub fn none() -> FaultPoints {
        FaultPoints::default()
    }

    /// Parses `HVNODE_FAULT`'s value; anything malformed disables fault points.
    pub fn parse(spec: Option<&str>) -> FaultPoints {
        let point = spec.and_then(|s| {
            let mut parts = s.splitn(3, ':');
            let (kind, step, when) = (parts.next()?, parts.next()?, parts.next()?);
            let moment = match when {
                "before" => Moment::Before,
                "after" => Moment::After,
                "undo" => Moment::Undo,
                _ => return None,
            };
            Some((kind.to_owned(), step.to_owned(), moment))
        });
        FaultPoints { point }
    }

    pub fn is_armed(&self) -> bool {
        self.point.is_some()
    }

    #[cfg_attr(not(any(test, feature = "fault-injection")), allow(dead_code))]
    fn matches(&self, kind: &str, step: &str, moment: Moment) -> bool {
        self.point
            .as_ref()
            .is_some_and(|(k, s, m)| k == kind && s == step && *m == moment)
    }

    /// The fault point the environment arms, in builds that have them.
    pub fn from_env() -> FaultPoints {
        #[cfg(feature = "fault-injection")]
        return FaultPoints::parse(std::env::var("HVNODE_FAULT").ok().as_deref());
        #[cfg(not(feature = "fault-injection"))]
        return FaultPoints::none();
    }

    pub fn hit(&self, kind: &str, step: &str, moment: Moment) {
        #[cfg(feature = "fault-injection")]
        if self.matches(kind, step, moment) {
            tracing::warn!(
                kind,
                step,
                ?moment,
                "fault point reached: killing the agent"
            );
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        #[cfg(not(feature = "fault-injection"))]
        let _ = (kind, step, moment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_names_one_boundary() {
        let f = FaultPoints::parse(Some("create:start_vm:after"));

        assert!(f.matches("create", "start_vm", Moment::After));
        assert!(!f.matches("create", "start_vm", Moment::Before));
        assert!(!f.matches("delete", "start_vm", Moment::After));
    }

    #[test]
    fn malformed_specs_disable_fault_points() {
        assert!(!FaultPoints::parse(Some("create:start_vm")).is_armed());
        assert!(!FaultPoints::parse(Some("create:x:sometime")).is_armed());
        assert!(!FaultPoints::parse(None).is_armed());
    }
}
