//! The create pipeline: admit, check on the core's blocking pool under a
//! deadline, reserve the name, let the backend prepare, commit, register,
//! hand over to the backend.

use std::sync::{Arc, Mutex};

use fuse_ctl::Errno;

use crate::op::Operation;
use crate::request::Request;

use super::admission::{abandoned, Attempt, AttemptState};
use super::registry::Reservation;
use super::{Agent, Input, Rejection, Reply, Requester, Step};

impl Agent {
    /// Takes one request from a door and returns at once: the checks run on
    /// the core's blocking pool under the request's deadline, and `reply`
    /// gets the new operation's name or why not (also recorded for the
    /// `errors` file).
    pub fn start_create(self: &Arc<Self>, who: Requester, input: Input, reply: Box<dyn Reply>) {
        if let Err(rejection) = self.admit(who.uid) {
            self.reject(&who, &rejection);
            return reply.finish(Err(rejection));
        }
        let attempt = Arc::new_cyclic(|me: &std::sync::Weak<Attempt>| {
            let me = me.clone();
            Attempt {
                agent: self.clone(),
                who,
                step: Step::watching(move || me.upgrade().is_none_or(|a| a.is_gone())),
                state: Mutex::new(AttemptState {
                    reply: Some(reply),
                    committed: false,
                    stuck: false,
                }),
            }
        });
        let deadline = self.backend().deadline(self.config.request_timeout);
        let worker = attempt.clone();
        let started = std::time::Instant::now();
        let checks = self.rt.spawn_blocking(move || {
            let result = worker.agent.create_checked(&worker, input);
            crate::metrics::answered(worker.who.uid, started, &result);
            worker.answer(result);
        });
        self.rt.spawn(async move {
            if tokio::time::timeout(deadline, checks).await.is_err() {
                attempt.expire(deadline);
            }
        });
    }

    /// The checks and the creation of one request, on a worker thread.
    pub(super) fn create_checked(
        &self,
        attempt: &Attempt,
        input: Input,
    ) -> Result<String, Rejection> {
        let who = &attempt.who;
        if attempt.is_gone() {
            // Interrupted or timed out while queued: nothing to do.
            return Err(abandoned());
        }
        #[cfg(debug_assertions)]
        if std::env::var_os("NNF_DM_TEST_PANIC").is_some_and(|v| v == "request") {
            panic!("test hook NNF_DM_TEST_PANIC=request");
        }
        let mut request = match input {
            Input::Text(bytes) => {
                Request::parse(&bytes).map_err(|e| Rejection::new(Errno::EINVAL, e.0))?
            }
            Input::Parsed(request) => {
                request
                    .check()
                    .map_err(|e| Rejection::new(Errno::EINVAL, e.0))?;
                request
            }
        };
        if let Some(name) = &request.name {
            crate::request::validate_name(name).map_err(|e| Rejection::new(Errno::EINVAL, e.0))?;
        }
        if request.workflow.is_none() && request.namespace.is_none() {
            let env = crate::environ::workflow_of(who.pid);
            request.workflow = env.0;
            request.namespace = env.1;
        }
        let reservation = self.reserve(who.uid, request.name.clone())?;
        let name = reservation.name.clone();
        let prepared = match self
            .backend()
            .prepare(who, name.clone(), request, &attempt.step)
        {
            Ok(prepared) => prepared,
            Err(rejection) => {
                self.unreserve(who.uid, &reservation);
                return Err(rejection);
            }
        };
        if !attempt.commit() {
            tracing::info!(op = %name, user = who.uid, "request abandoned by its writer or its deadline: nothing created");
            self.backend().discard(&prepared.op, prepared.plan);
            self.unreserve(who.uid, &reservation);
            return Err(abandoned());
        }
        let op = prepared.op;
        if let Err(rejection) = self.register_reserved(op.clone(), &reservation) {
            self.backend().discard(&op, prepared.plan);
            self.unreserve(who.uid, &reservation);
            return Err(rejection);
        }
        if let Err(rejection) = self.backend().accept(op.clone(), prepared.plan) {
            // Not in a FUSE callback: the kernel may be told at once.
            self.unregister(&op, true);
            return Err(rejection);
        }
        tracing::info!(op = %name, user = who.uid, source = %op.request.source, destination = %op.request.destination, "operation created");
        Ok(name)
    }

    /// Takes `name` (or a generated one) for `uid` before any backend work,
    /// counting it against the user's limit.
    pub(super) fn reserve(&self, uid: u32, name: Option<String>) -> Result<Reservation, Rejection> {
        let mut registry = self.registry.write().unwrap();
        let name = match name {
            Some(name) => {
                if registry.ops.contains_key(&name) {
                    return Err(Rejection::new(
                        Errno::EEXIST,
                        format!("name '{name}' is in use"),
                    ));
                }
                if registry.reserved.contains_key(&name) {
                    return Err(Rejection::new(
                        Errno::EEXIST,
                        format!("name '{name}' is in use by a request still being checked"),
                    ));
                }
                name
            }
            None => loop {
                let name = generate_name();
                if !registry.in_use(&name) {
                    break name;
                }
            },
        };
        self.check_limit(&registry, uid)?;
        registry.next_token += 1;
        let token = registry.next_token;
        registry.reserved.insert(name.clone(), (token, uid));
        *registry.per_user.entry(uid).or_default() += 1;
        Ok(Reservation { name, token })
    }

    /// Gives a reserved name back (only if it is still this reservation's).
    pub(super) fn unreserve(&self, uid: u32, reservation: &Reservation) {
        let mut registry = self.registry.write().unwrap();
        if registry.reserved.get(&reservation.name).map(|r| r.0) == Some(reservation.token) {
            registry.reserved.remove(&reservation.name);
            registry.release(uid);
        }
    }

    /// Turns a reservation into a visible operation.
    pub(super) fn register_reserved(
        &self,
        op: Arc<Operation>,
        reservation: &Reservation,
    ) -> Result<(), Rejection> {
        let mut registry = self.registry.write().unwrap();
        if registry.reserved.get(&op.name).map(|r| r.0) != Some(reservation.token) {
            return Err(Rejection::new(
                Errno::EIO,
                format!("the reservation of '{}' was lost", op.name),
            ));
        }
        self.show_op_dir(&op)?;
        registry.reserved.remove(&op.name);
        registry.ops.insert(op.name.clone(), op.clone());
        Ok(())
    }
}

/// A fresh name for a request that gave none.
fn generate_name() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 8];
    crate::sys::random_bytes(&mut bytes);
    let suffix: String = bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    format!("dm-{suffix}")
}
