//! The writer's workflow, from the environment it was started with.

/// `(DW_WORKFLOW_NAME, DW_WORKFLOW_NAMESPACE)` of process (or thread) `pid`.
/// Unreadable environments (pid 0 from another pid namespace, a process that
/// is gone) count as absent.
pub fn workflow_of(pid: u32) -> (Option<String>, Option<String>) {
    if pid == 0 {
        return (None, None);
    }
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return (None, None);
    };
    let mut name = None;
    let mut namespace = None;
    for var in environ.split(|b| *b == 0) {
        let Ok(var) = std::str::from_utf8(var) else {
            continue;
        };
        if let Some(v) = var.strip_prefix("DW_WORKFLOW_NAME=") {
            name = Some(v.to_string());
        } else if let Some(v) = var.strip_prefix("DW_WORKFLOW_NAMESPACE=") {
            namespace = Some(v.to_string());
        }
    }
    (name, namespace)
}
