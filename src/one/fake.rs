//! An in-memory, scripted [`OneBackend`] for cheap unit scenarios of apply and reconcile
//! (the onesim scenarios in `tests/` are the faithful ones; these run in microseconds).
//!
//! Owns: a queue of scripted answers per call and the log of every call made (and of
//! every body sent), so a test asserts the exact calls. Must not: simulate OpenNebula (that is onesim's job): a call
//! without a scripted answer fails the test with the call named.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde_json::Value;

use super::backend::{
    BackendError, BackendErrorKind, BackendFuture, Document, Identity, NameScope, OneBackend,
    VmRecord,
};

/// One scripted answer.
#[derive(Debug)]
#[allow(dead_code)] // every answer a backend call can need, whether a scenario uses it yet or not
pub enum Answer {
    /// `one.system.version`.
    Version(String),
    /// `one.user.info(-1)`.
    Whoami(Identity),
    /// `GET /service`.
    Services(Vec<Document>),
    /// `one.vmpool.infoextended`.
    Vms(Vec<VmRecord>),
    /// `GET /service/:id`.
    Service(Document),
    /// `one.vm.info` (boxed: a VM record is the largest answer by far).
    Vm(Box<VmRecord>),
    /// `(id, name)` listings of VM templates or networks.
    Names(Vec<(u64, String)>),
    /// The name of one VM template or network.
    Name(String),
    /// A mutation that succeeds (`()`).
    Done,
    /// A call that fails.
    Fail(BackendErrorKind, &'static str),
}

/// The scripted backend. Every call is logged as one line (`verb args`), then answered
/// with the first scripted answer; a wrong or missing answer is a `Decode` error that
/// names the call, which the code under test surfaces.
#[derive(Debug, Default)]
pub struct Scripted {
    answers: Mutex<VecDeque<Answer>>,
    calls: Mutex<Vec<String>>,
    bodies: Mutex<Vec<Value>>,
    vm_templates: Mutex<Vec<String>>,
}

impl Scripted {
    /// A backend that answers `answers`, in order.
    pub fn new(answers: impl IntoIterator<Item = Answer>) -> Self {
        Self {
            answers: Mutex::new(answers.into_iter().collect()),
            calls: Mutex::default(),
            bodies: Mutex::default(),
            vm_templates: Mutex::default(),
        }
    }

    /// Every call made so far, one line each.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("calls").clone()
    }

    /// Every body sent (service templates created or updated, services updated), in order.
    pub fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().expect("bodies").clone()
    }

    /// Every template merged into a VM (`one.vm.update` append), in order.
    pub fn vm_templates(&self) -> Vec<String> {
        self.vm_templates.lock().expect("vm templates").clone()
    }

    /// Keep `body` and give its compact form for the call log.
    fn sent(&self, body: Value) -> String {
        let line = brief(&body);
        self.bodies.lock().expect("bodies").push(body);
        line
    }

    /// Answers not consumed.
    pub fn unused(&self) -> usize {
        self.answers.lock().expect("answers").len()
    }

    fn next<T: Send + 'static>(
        &self,
        call: String,
        pick: impl FnOnce(Answer) -> Result<T, Answer> + Send + 'static,
    ) -> BackendFuture<'_, T> {
        self.calls.lock().expect("calls").push(call.clone());
        let answer = self.answers.lock().expect("answers").pop_front();
        Box::pin(async move {
            match answer {
                Some(Answer::Fail(kind, message)) => Err(BackendError::new(kind, message)),
                Some(a) => pick(a).map_err(|a| {
                    BackendError::new(
                        BackendErrorKind::Decode,
                        format!("scripted answer {a:?} does not fit call {call}"),
                    )
                }),
                None => Err(BackendError::new(
                    BackendErrorKind::Decode,
                    format!("no scripted answer for call {call}"),
                )),
            }
        })
    }

    fn done(&self, call: String) -> BackendFuture<'_, ()> {
        self.next(call, |a| match a {
            Answer::Done => Ok(()),
            a => Err(a),
        })
    }
}

/// The compact form of a body in the call log: its `name`, or `{…}`.
fn brief(body: &Value) -> String {
    body.get("name")
        .and_then(Value::as_str)
        .map_or_else(|| "{…}".into(), |n| format!("{n:?}"))
}

impl OneBackend for Scripted {
    fn system_version(&self) -> BackendFuture<'_, String> {
        self.next("system_version".into(), |a| match a {
            Answer::Version(v) => Ok(v),
            a => Err(a),
        })
    }
    fn whoami(&self) -> BackendFuture<'_, Identity> {
        self.next("whoami".into(), |a| match a {
            Answer::Whoami(i) => Ok(i),
            a => Err(a),
        })
    }
    fn list_services(&self) -> BackendFuture<'_, Vec<Document>> {
        self.next("list_services".into(), |a| match a {
            Answer::Services(s) => Ok(s),
            a => Err(a),
        })
    }
    fn list_vms(&self, page_size: u32) -> BackendFuture<'_, Vec<VmRecord>> {
        self.next(format!("list_vms {page_size}"), |a| match a {
            Answer::Vms(v) => Ok(v),
            a => Err(a),
        })
    }
    fn list_service_templates(&self) -> BackendFuture<'_, Vec<Document>> {
        self.next("list_service_templates".into(), |a| match a {
            Answer::Services(s) => Ok(s),
            a => Err(a),
        })
    }
    fn create_service_template(&self, body: Value) -> BackendFuture<'_, u64> {
        self.next(
            format!("create_service_template {}", self.sent(body)),
            |a| match a {
                Answer::Service(d) => Ok(d.id),
                a => Err(a),
            },
        )
    }
    fn update_service_template(&self, id: u64, body: Value) -> BackendFuture<'_, ()> {
        self.done(format!("update_service_template {id} {}", self.sent(body)))
    }
    fn instantiate(&self, template_id: u64, merge: Value) -> BackendFuture<'_, u64> {
        self.next(
            format!("instantiate {template_id} {}", brief(&merge)),
            |a| match a {
                Answer::Service(d) => Ok(d.id),
                a => Err(a),
            },
        )
    }
    fn get_service(&self, id: u64) -> BackendFuture<'_, Document> {
        self.next(format!("get_service {id}"), |a| match a {
            Answer::Service(d) => Ok(d),
            a => Err(a),
        })
    }
    fn update_service(&self, id: u64, body: Value) -> BackendFuture<'_, ()> {
        self.done(format!("update_service {id} {}", self.sent(body)))
    }
    fn scale(&self, service_id: u64, role: &str, cardinality: u32) -> BackendFuture<'_, ()> {
        self.done(format!("scale {service_id} {role} {cardinality}"))
    }
    fn delete_service(&self, service_id: u64) -> BackendFuture<'_, ()> {
        self.done(format!("delete_service {service_id}"))
    }
    fn vm_update_merge(&self, vm_id: u64, template: String) -> BackendFuture<'_, ()> {
        let keys: Vec<&str> = template
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        let call = format!("vm_update_merge {vm_id} {}", keys.join(","));
        self.vm_templates
            .lock()
            .expect("vm templates")
            .push(template.clone());
        self.done(call)
    }
    fn vm_info(&self, vm_id: u64) -> BackendFuture<'_, VmRecord> {
        self.next(format!("vm_info {vm_id}"), |a| match a {
            Answer::Vm(v) => Ok(*v),
            a => Err(a),
        })
    }
    fn vm_terminate_hard(&self, vm_id: u64) -> BackendFuture<'_, ()> {
        self.done(format!("vm_terminate_hard {vm_id}"))
    }
    fn vm_templates(&self, scope: NameScope) -> BackendFuture<'_, Vec<(u64, String)>> {
        self.next(format!("vm_templates {scope:?}"), names)
    }
    fn networks(&self, scope: NameScope) -> BackendFuture<'_, Vec<(u64, String)>> {
        self.next(format!("networks {scope:?}"), names)
    }
    fn vm_template_name(&self, id: u64) -> BackendFuture<'_, String> {
        self.next(format!("vm_template_name {id}"), name)
    }
    fn network_name(&self, id: u64) -> BackendFuture<'_, String> {
        self.next(format!("network_name {id}"), name)
    }
}

fn names(a: Answer) -> Result<Vec<(u64, String)>, Answer> {
    match a {
        Answer::Names(n) => Ok(n),
        a => Err(a),
    }
}

fn name(a: Answer) -> Result<String, Answer> {
    match a {
        Answer::Name(n) => Ok(n),
        a => Err(a),
    }
}
