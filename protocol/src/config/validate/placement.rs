//! `[placement]`: the node's host name and Swarm placement constraints.

use super::super::raw::RawPlacement;
use super::super::{Constraint, NodeHost, Placement};
use super::checker::{kk, Checker};

/// `[placement]`; an empty placement when the section is absent. Every problem names its key
/// (`placement.host`, `placement.constraints[1]`).
pub(super) fn placement(c: &mut Checker<'_>, raw: Option<&RawPlacement>) -> Placement {
    let Some(raw) = raw else {
        return Placement::default();
    };
    let host = raw.host.as_deref().and_then(|h| match NodeHost::new(h) {
        Ok(h) => Some(h),
        Err(why) => {
            c.add(
                &kk("placement", "host"),
                format!("{why}; give the swarm node's host name (`docker node ls`)"),
            );
            None
        }
    });
    let mut constraints = Vec::new();
    for (i, expr) in raw.constraints.iter().enumerate() {
        match Constraint::parse(expr) {
            Ok(con) => constraints.push(con),
            Err(why) => c.add(&kk("placement", "constraints").index(i), why),
        }
    }
    Placement::new(host, constraints)
}
