//! `--simulated`: every request completes at once, without a cluster and
//! without copying, on the same control files and socket. As upstream's
//! `simulatedServer` (nnf-dm `daemons/compute/server/servers/server_sim.go`),
//! which accepts every Create and reports success; we differ in two ways,
//! deliberately: the operation is `completed` at once (upstream answers
//! `RUNNING` to the first status calls, which only slows test scripts), and
//! the request still goes through the core's parser, names and per-user
//! limits, so what a script learns against the simulator holds on a node.
//!
//! Nothing touches a user's file system: no `stat` of source or
//! destination, no record. Operations live in memory until `rmdir` or
//! `--retention`.

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use crate::agent::{Backend, Notify, Prepared, Rejection, Requester, Step};
use crate::op::{Counters, Operation, Outcome, State, Status};
use crate::request::Request;

pub struct SimulatedBackend {
    notify: Notify,
}

impl SimulatedBackend {
    pub fn new(notify: Notify) -> Arc<SimulatedBackend> {
        Arc::new(SimulatedBackend { notify })
    }
}

/// The command upstream's simulator reports, with the request's paths.
fn simulated_command(request: &Request) -> String {
    if request.dryrun {
        "true".to_string()
    } else {
        format!(
            "mpirun -np 1 dcp --progress 1 {} {}",
            request.source, request.destination
        )
    }
}

impl Backend for SimulatedBackend {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn prepare(
        &self,
        who: &Requester,
        name: String,
        mut request: Request,
        _step: &Step,
    ) -> Result<Prepared, Rejection> {
        request.name = Some(name.clone());
        request.profile = Some(request.profile.unwrap_or_else(|| "default".to_string()));
        let target = PathBuf::from(&request.destination);
        let op = Operation::new(name, who.uid, who.gid, request, target, Status::default());
        Ok(Prepared {
            op: Arc::new(op),
            plan: Box::new(()),
        })
    }

    fn accept(&self, op: Arc<Operation>, _plan: Box<dyn Any + Send>) -> Result<(), Rejection> {
        let now = SystemTime::now();
        let command = simulated_command(&op.request);
        op.update(|s| {
            s.state = State::Completed;
            s.outcome = Outcome::Success;
            s.progress = 100;
            s.start_time = Some(now);
            s.end_time = Some(now);
            s.command = command;
            s.counters = Some(Counters::default());
        });
        tracing::info!(op = %op.name, user = op.uid, "simulated: completed at once");
        self.notify.changed(&op);
        Ok(())
    }

    fn cancel(&self, _op: &Arc<Operation>) {
        // Completed at accept: nothing left to cancel.
    }

    fn remove(&self, _op: &Operation) -> Result<(), Rejection> {
        Ok(())
    }
}
