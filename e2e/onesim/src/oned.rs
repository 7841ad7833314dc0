//! oned's XML-RPC methods on `POST /RPC2`: arity/type checks (xmlrpc-c faults), session
//! authentication, OpenNebula response arrays, pool filters, ranges and pagination.

use crate::render;
use crate::state::{
    epoch_s, err, no_exists, OneErr, Op, State, User, ACTION, AUTHENTICATION, AUTHORIZATION,
    LOCKED, RPC_API, S_DONE,
};
use crate::template::Template;
use crate::xmlrpc::{OkVal, Resp, XVal, FAULT_INDEX, FAULT_NO_METHOD, FAULT_TYPE};

/// Parameter counts (including the session string): (min, max).
pub fn arity(method: &str) -> Option<(usize, usize)> {
    Some(match method {
        "one.system.version" | "one.userpool.info" => (1, 1),
        "one.user.info" | "one.vm.info" | "one.vn.info" | "one.document.info"
        | "one.image.info" | "one.image.delete" => (2, 3),
        "one.image.allocate" => (3, 4),
        "one.imagepool.info" => (4, 4),
        "one.user.allocate" => (4, 5),
        "one.user.delete" | "one.vn.delete" | "one.document.unlock" => (2, 2),
        "one.user.passwd" | "one.vm.action" | "one.vm.recover" | "one.vmpool.infoset" => (3, 3),
        "one.user.login" => (5, 5),
        "one.vm.update" | "one.vm.updateconf" | "one.template.update" | "one.document.lock" => {
            (3, 4)
        }
        "one.vmpool.info" | "one.vmpool.infoextended" => (5, 6),
        "one.template.info" => (2, 4),
        "one.template.allocate" => (2, 2),
        "one.template.delete" | "one.vn.allocate" => (2, 3),
        "one.template.instantiate" => (3, 6),
        "one.templatepool.info" | "one.vnpool.info" => (4, 4),
        "one.documentpool.info" => (5, 5),
        "one.document.allocate" => (3, 3),
        "one.document.update" => (3, 4),
        "one.vm.chmod" | "one.template.chmod" | "one.vn.chmod" | "one.document.chmod"
        | "one.image.chmod" => (11, 11),
        _ => return None,
    })
}

/// True for methods that change state (recorded in the event log).
pub fn is_mutating(method: &str) -> bool {
    !(method.ends_with(".info")
        || method.ends_with(".infoextended")
        || method.ends_with(".infoset")
        || method == "one.system.version")
}

/// Arguments for the event log: the session is dropped and passwords are masked.
pub fn log_args(method: &str, params: &[XVal]) -> serde_json::Value {
    let mut v: Vec<serde_json::Value> = params.iter().skip(1).map(XVal::to_json).collect();
    let secret_at = match method {
        "one.user.allocate" => Some(1),
        "one.user.passwd" => Some(1),
        "one.user.login" => Some(1),
        _ => None,
    };
    if let Some(i) = secret_at {
        if let Some(x) = v.get_mut(i) {
            *x = serde_json::Value::String("***".into());
        }
    }
    serde_json::Value::Array(v)
}

struct P<'a>(&'a [XVal]);

fn type_fault(i: usize, what: &str) -> Resp {
    Resp::Fault {
        code: FAULT_TYPE,
        msg: format!("Parameter {i} is not {what}"),
    }
}

impl P<'_> {
    fn int(&self, i: usize) -> Result<i64, Resp> {
        match self.0.get(i) {
            Some(XVal::Int(v)) => Ok(*v),
            Some(_) => Err(type_fault(i, "an integer")),
            None => Err(Resp::Fault {
                code: FAULT_INDEX,
                msg: "Not enough parameters".into(),
            }),
        }
    }
    fn str(&self, i: usize) -> Result<&str, Resp> {
        match self.0.get(i) {
            Some(XVal::Str(v)) => Ok(v),
            Some(_) => Err(type_fault(i, "a string")),
            None => Err(Resp::Fault {
                code: FAULT_INDEX,
                msg: "Not enough parameters".into(),
            }),
        }
    }
    fn boolean(&self, i: usize) -> Result<bool, Resp> {
        match self.0.get(i) {
            Some(XVal::Bool(v)) => Ok(*v),
            Some(_) => Err(type_fault(i, "a boolean")),
            None => Err(Resp::Fault {
                code: FAULT_INDEX,
                msg: "Not enough parameters".into(),
            }),
        }
    }
    fn opt_int(&self, i: usize, d: i64) -> Result<i64, Resp> {
        if self.0.len() > i {
            self.int(i)
        } else {
            Ok(d)
        }
    }
    fn opt_bool(&self, i: usize, d: bool) -> Result<bool, Resp> {
        if self.0.len() > i {
            self.boolean(i)
        } else {
            Ok(d)
        }
    }
    fn opt_str(&self, i: usize) -> Result<&str, Resp> {
        if self.0.len() > i {
            self.str(i)
        } else {
            Ok("")
        }
    }
}

fn one_err(method: &str, e: OneErr) -> Resp {
    Resp::Err {
        msg: format!("[{method}] {}", e.msg),
        code: e.code,
        resp_id: e.resp_id,
    }
}

/// Checks arity and the session before anything else; returns a fault/error or the uid.
pub fn precheck(st: &State, method: &str, params: &[XVal]) -> Result<i64, Resp> {
    let Some((min, max)) = arity(method) else {
        return Err(Resp::Fault {
            code: FAULT_NO_METHOD,
            msg: format!("Requested method '{method}' does not exist"),
        });
    };
    if params.len() < min {
        return Err(Resp::Fault {
            code: FAULT_INDEX,
            msg: "Not enough parameters".into(),
        });
    }
    if params.len() > max {
        return Err(Resp::Fault {
            code: FAULT_INDEX,
            msg: "Too many parameters".into(),
        });
    }
    let p = P(params);
    let session = p.str(0)?;
    st.auth(session).ok_or_else(|| {
        one_err(
            method,
            err(
                AUTHENTICATION,
                "User couldn't be authenticated, aborting call.",
            ),
        )
    })
}

/// Executes an authenticated call.
pub fn dispatch(st: &mut State, method: &str, params: &[XVal], uid: i64) -> Resp {
    match call(st, method, &P(params), uid) {
        Ok(v) => Resp::Ok(v),
        Err(Ok(e)) => one_err(method, e),
        Err(Err(fault)) => fault,
    }
}

type R = Result<OkVal, Result<OneErr, Resp>>;

fn f<T>(r: Result<T, Resp>) -> Result<T, Result<OneErr, Resp>> {
    r.map_err(Err)
}

fn e<T>(r: Result<T, OneErr>) -> Result<T, Result<OneErr, Resp>> {
    r.map_err(Ok)
}

fn authz(uid: i64, owner: i64, what: &str) -> Result<(), OneErr> {
    if uid == 0 || uid == owner {
        Ok(())
    } else {
        Err(err(
            AUTHORIZATION,
            format!("User [{uid}] not authorized to perform action on {what}."),
        ))
    }
}

/// `op` on VM template `id` is granted to `uid` (NO_EXISTS when there is none).
fn template_op(st: &State, uid: i64, id: i64, op: Op) -> Result<(), OneErr> {
    let t = st
        .templates
        .get(&id)
        .ok_or_else(|| no_exists("virtual machine template", id))?;
    st.authorize(uid, &t.own, op, "virtual machine template")
}

fn call(st: &mut State, method: &str, p: &P, uid: i64) -> R {
    let mut out = String::new();
    match method {
        "one.system.version" => return Ok(OkVal::Str(crate::ONE_VERSION.into())),
        "one.user.info" => {
            let mut id = f(p.int(1))?;
            let decrypt = f(p.opt_bool(2, false))?;
            if id == -1 {
                id = uid;
            }
            e(authz(uid, id, "user"))?;
            let u = e(st.users.get(&id).ok_or_else(|| no_exists("user", id)))?;
            render::user(&mut out, u, decrypt && uid == 0, false);
        }
        "one.userpool.info" => {
            out.push_str("<USER_POOL>");
            let users: Vec<&User> = st
                .users
                .values()
                .filter(|u| uid == 0 || u.id == uid)
                .collect();
            for u in &users {
                render::user(&mut out, u, false, true);
            }
            for u in &users {
                out.push_str(&format!("<QUOTAS><ID>{}</ID></QUOTAS>", u.id));
            }
            out.push_str("<DEFAULT_USER_QUOTAS><DATASTORE_QUOTA/><NETWORK_QUOTA/><VM_QUOTA/><IMAGE_QUOTA/></DEFAULT_USER_QUOTAS>");
            out.push_str("</USER_POOL>");
        }
        "one.user.allocate" => {
            let name = f(p.str(1))?.to_string();
            let pass = f(p.str(2))?.to_string();
            let driver = f(p.str(3))?;
            e(authz(uid, 0, "user"))?;
            return e(st.alloc_user(&name, &pass, driver)).map(OkVal::Int);
        }
        "one.user.delete" => {
            let id = f(p.int(1))?;
            e(authz(uid, -2, "user"))?;
            if id == 0 {
                return Err(Ok(
                    err(crate::state::ACTION, "oneadmin cannot be deleted.").with_id(0)
                ));
            }
            e(st.users
                .remove(&id)
                .map(|_| ())
                .ok_or_else(|| no_exists("user", id)))?;
            st.dirty = true;
            return Ok(OkVal::Int(id));
        }
        "one.user.passwd" => {
            let id = f(p.int(1))?;
            let pass = f(p.str(2))?.to_string();
            e(authz(uid, id, "user"))?;
            let u = e(st.users.get_mut(&id).ok_or_else(|| no_exists("user", id)))?;
            u.password = pass;
            st.dirty = true;
            return Ok(OkVal::Int(id));
        }
        "one.user.login" => {
            let name = f(p.str(1))?.to_string();
            let mut token = f(p.str(2))?.to_string();
            let valid = f(p.int(3))?;
            let _egid = f(p.int(4))?;
            let u = e(st
                .users
                .values_mut()
                .find(|u| u.name == name)
                .ok_or_else(|| err(crate::state::NO_EXISTS, "Error getting user")))?;
            if u.id != uid && uid != 0 {
                return Err(Ok(err(
                    AUTHORIZATION,
                    format!("User [{uid}] not authorized to perform action on user."),
                )));
            }
            if valid == 0 {
                u.tokens.clear();
            } else {
                if token.is_empty() {
                    token = crate::state::random_hex(20);
                }
                let exp = if valid < 0 { -1 } else { epoch_s() + valid };
                u.tokens.retain(|(t, _)| *t != token);
                u.tokens.push((token.clone(), exp));
            }
            st.dirty = true;
            return Ok(OkVal::Str(token));
        }
        "one.vm.info" => {
            let id = f(p.int(1))?;
            let vm = e(st.vm(id))?;
            e(st.authorize(uid, &vm.own, Op::Use, "virtual machine")
                .map_err(|x| x.with_id(id)))?;
            render::vm_full(&mut out, vm);
        }
        "one.vm.action" => {
            let action = f(p.str(1))?.to_string();
            let id = f(p.int(2))?;
            let own = e(st.vm(id))?.own.clone();
            e(st.authorize(uid, &own, Op::Manage, "virtual machine"))?;
            return e(st.vm_action(&action, id)).map(OkVal::Int);
        }
        "one.vm.update" | "one.vm.updateconf" => {
            let id = f(p.int(1))?;
            let tmpl = f(p.str(2))?.to_string();
            let kind = f(p.opt_int(3, 0))?;
            let own = e(st.vm(id))?.own.clone();
            e(st.authorize(uid, &own, Op::Manage, "virtual machine"))?;
            let r = if method == "one.vm.update" {
                st.vm_update(id, &tmpl, kind)
            } else {
                st.vm_updateconf(id, &tmpl, kind)
            };
            return e(r).map(OkVal::Int);
        }
        "one.vm.recover" => {
            let id = f(p.int(1))?;
            let op = f(p.int(2))?;
            let own = e(st.vm(id))?.own.clone();
            e(st.authorize(uid, &own, Op::Manage, "virtual machine"))?;
            return e(st.vm_recover(id, op)).map(OkVal::Int);
        }
        "one.vmpool.info" | "one.vmpool.infoextended" => {
            let filter = f(p.int(1))?;
            let start = f(p.int(2))?;
            let end = f(p.int(3))?;
            let state = f(p.int(4))?;
            let query = f(p.opt_str(5))?;
            e(check_filter(filter))?;
            if !(-2..=11).contains(&state) {
                return Err(Ok(err(RPC_API, format!("Incorrect state filter {state}"))));
            }
            if !query.is_empty() {
                return Err(Ok(err(
                    crate::state::INTERNAL,
                    "JSON query search is not supported by the SQL backend",
                )));
            }
            let extended = method.ends_with("infoextended");
            out.reserve(if extended { 4096 } else { 1024 } * 16);
            out.push_str("<VM_POOL>");
            let vms = st.vms.values().filter(|v| {
                st.visible(uid, filter, &v.own)
                    && match state {
                        -2 => true,
                        -1 => v.state != S_DONE,
                        s => v.state == s as u32,
                    }
            });
            for vm in range(vms, |v| v.id, start, end) {
                if extended {
                    render::vm_full(&mut out, vm)
                } else {
                    render::vm_short(&mut out, vm)
                }
            }
            out.push_str("</VM_POOL>");
        }
        "one.vmpool.infoset" => {
            let ids = f(p.str(1))?.to_string();
            let extended = f(p.boolean(2))?;
            out.push_str("<VM_POOL>");
            let mut wanted: Vec<i64> = ids
                .split(',')
                .filter_map(|x| x.trim().parse().ok())
                .collect();
            wanted.sort_unstable();
            for id in wanted {
                if let Some(vm) = st.vms.get(&id).filter(|v| st.visible(uid, -2, &v.own)) {
                    if extended {
                        render::vm_full(&mut out, vm)
                    } else {
                        render::vm_short(&mut out, vm)
                    }
                }
            }
            out.push_str("</VM_POOL>");
        }
        "one.template.info" => {
            let id = f(p.int(1))?;
            let _ = f(p.opt_bool(2, false))?;
            let _ = f(p.opt_bool(3, false))?;
            let t = e(st
                .templates
                .get(&id)
                .ok_or_else(|| no_exists("virtual machine template", id)))?;
            e(st.authorize(uid, &t.own, Op::Use, "virtual machine template"))?;
            render::vm_template(&mut out, t);
        }
        "one.template.allocate" => {
            let t = f(p.str(1))?.to_string();
            return e(st.alloc_template(&t, uid)).map(OkVal::Int);
        }
        "one.template.update" => {
            let id = f(p.int(1))?;
            let tmpl = f(p.str(2))?.to_string();
            let kind = f(p.opt_int(3, 0))?;
            if kind != 0 && kind != 1 {
                return Err(Ok(err(RPC_API, "Wrong update type").with_id(id)));
            }
            let new =
                e(Template::parse(&tmpl).map_err(|m| err(crate::state::INTERNAL, m).with_id(id)))?;
            e(template_op(st, uid, id, Op::Manage))?;
            let t = e(st
                .templates
                .get_mut(&id)
                .ok_or_else(|| no_exists("virtual machine template", id)))?;
            if let Some(n) = new.get("NAME") {
                t.name = n.to_string();
            }
            let mut new = new;
            new.remove("NAME");
            if kind == 0 {
                t.template = new
            } else {
                t.template.merge(&new)
            }
            st.dirty = true;
            return Ok(OkVal::Int(id));
        }
        "one.template.delete" => {
            let id = f(p.int(1))?;
            let _ = f(p.opt_bool(2, false))?;
            let t = e(st
                .templates
                .get(&id)
                .ok_or_else(|| no_exists("virtual machine template", id)))?;
            e(st.authorize(uid, &t.own, Op::Manage, "virtual machine template"))?;
            if t.lock.is_some() {
                return Err(Ok(err(
                    LOCKED,
                    format!("The resource virtual machine template is locked. [{id}]"),
                )
                .with_id(id)));
            }
            st.templates.remove(&id);
            st.dirty = true;
            return Ok(OkVal::Int(id));
        }
        "one.template.instantiate" => {
            let id = f(p.int(1))?;
            let name = f(p.str(2))?.to_string();
            let hold = f(p.opt_bool(3, false))?;
            let extra = f(p.opt_str(4))?.to_string();
            let _persistent = f(p.opt_bool(5, false))?;
            e(template_op(st, uid, id, Op::Use))?;
            return e(st.instantiate(id, &name, hold, &extra, uid)).map(OkVal::Int);
        }
        "one.templatepool.info" => {
            let (filter, start, end) = (f(p.int(1))?, f(p.int(2))?, f(p.int(3))?);
            e(check_filter(filter))?;
            out.push_str("<VMTEMPLATE_POOL>");
            let it = st
                .templates
                .values()
                .filter(|t| st.visible(uid, filter, &t.own));
            for t in range(it, |t| t.id, start, end) {
                render::vm_template(&mut out, t);
            }
            out.push_str("</VMTEMPLATE_POOL>");
        }
        "one.vn.info" => {
            let id = f(p.int(1))?;
            let n = e(st
                .vnets
                .get(&id)
                .ok_or_else(|| no_exists("virtual network", id)))?;
            e(st.authorize(uid, &n.own, Op::Use, "virtual network"))?;
            // MANAGE shows every lease; USE only those of VMs the caller may see.
            let all = st.may(uid, &n.own, Op::Manage);
            let leases: Vec<_> = n
                .leases()
                .into_iter()
                .filter(|l| {
                    all || st
                        .vms
                        .get(&l.3)
                        .is_some_and(|v| st.visible(uid, -2, &v.own))
                })
                .collect();
            render::vnet(&mut out, n, &leases, false);
        }
        "one.vn.allocate" => {
            let t = f(p.str(1))?.to_string();
            let _cluster = f(p.opt_int(2, -1))?;
            return e(st.alloc_vnet(&t, uid)).map(OkVal::Int);
        }
        "one.vn.delete" => {
            let id = f(p.int(1))?;
            let n = e(st
                .vnets
                .get(&id)
                .ok_or_else(|| no_exists("virtual network", id)))?;
            e(st.authorize(uid, &n.own, Op::Manage, "virtual network"))?;
            if !n.leases().is_empty() {
                return Err(Ok(err(
                    crate::state::ACTION,
                    "Can not remove a virtual network with leases in use",
                )
                .with_id(id)));
            }
            st.vnets.remove(&id);
            st.dirty = true;
            return Ok(OkVal::Int(id));
        }
        "one.vnpool.info" => {
            let (filter, start, end) = (f(p.int(1))?, f(p.int(2))?, f(p.int(3))?);
            e(check_filter(filter))?;
            out.push_str("<VNET_POOL>");
            let it = st
                .vnets
                .values()
                .filter(|n| st.visible(uid, filter, &n.own));
            for n in range(it, |n| n.id, start, end) {
                render::vnet(&mut out, n, &n.leases(), true);
            }
            out.push_str("</VNET_POOL>");
        }
        "one.image.allocate" => {
            let t = f(p.str(1))?.to_string();
            let ds = f(p.int(2))?;
            let _skip_capacity = f(p.opt_bool(3, false))?;
            return e(st.alloc_image(&t, ds, uid)).map(OkVal::Int);
        }
        "one.image.info" => {
            let id = f(p.int(1))?;
            let _ = f(p.opt_bool(2, false))?;
            let i = e(st.image(id))?;
            e(st.authorize(uid, &i.own, Op::Use, "image"))?;
            render::image(&mut out, i);
        }
        "one.image.delete" => {
            let id = f(p.int(1))?;
            let force = f(p.opt_bool(2, false))?;
            return e(st.delete_image(id, force, uid)).map(OkVal::Int);
        }
        "one.imagepool.info" => {
            let (filter, start, end) = (f(p.int(1))?, f(p.int(2))?, f(p.int(3))?);
            e(check_filter(filter))?;
            out.push_str("<IMAGE_POOL>");
            let it = st
                .images
                .values()
                .filter(|i| st.visible(uid, filter, &i.own));
            for i in range(it, |i| i.id, start, end) {
                render::image(&mut out, i);
            }
            out.push_str("</IMAGE_POOL>");
        }
        "one.vm.chmod" | "one.template.chmod" | "one.vn.chmod" | "one.document.chmod"
        | "one.image.chmod" => {
            let id = f(p.int(1))?;
            let mut flags = [0i64; 9];
            for (i, flag) in flags.iter_mut().enumerate() {
                *flag = f(p.int(2 + i))?;
            }
            let kind = method.split('.').nth(1).unwrap_or_default();
            let (what, own) = match kind {
                "vm" => ("virtual machine", st.vms.get(&id).map(|o| &o.own)),
                "template" => (
                    "virtual machine template",
                    st.templates.get(&id).map(|o| &o.own),
                ),
                "vn" => ("virtual network", st.vnets.get(&id).map(|o| &o.own)),
                "image" => ("image", st.images.get(&id).map(|o| &o.own)),
                _ => ("document", st.docs.get(&id).map(|o| &o.own)),
            };
            let own = e(own.cloned().ok_or_else(|| no_exists(what, id)))?;
            e(st.authorize(uid, &own, Op::Manage, what))?;
            let perms = crate::state::chmod_flags(own.perms, flags);
            let slot = match kind {
                "vm" => st.vms.get_mut(&id).map(|o| &mut o.own),
                "template" => st.templates.get_mut(&id).map(|o| &mut o.own),
                "vn" => st.vnets.get_mut(&id).map(|o| &mut o.own),
                "image" => st.images.get_mut(&id).map(|o| &mut o.own),
                _ => st.docs.get_mut(&id).map(|o| &mut o.own),
            };
            if let Some(o) = slot {
                o.perms = perms;
            }
            st.dirty = true;
            return Ok(OkVal::Int(id));
        }
        "one.document.info" => {
            let id = f(p.int(1))?;
            let d = e(st.docs.get(&id).ok_or_else(|| no_exists("document", id)))?;
            e(st.authorize(uid, &d.own, Op::Use, "document"))?;
            render::document(&mut out, d);
        }
        "one.document.allocate" => {
            let text = f(p.str(1))?.to_string();
            let ty = f(p.int(2))?;
            let mut t = e(Template::parse(&text).map_err(|m| err(crate::state::INTERNAL, m)))?;
            let name = t.get("NAME").unwrap_or_default().to_string();
            t.remove("NAME");
            let id = st.alloc_doc(&name, ty, serde_json::Value::Null, uid);
            if let Some(d) = st.docs.get_mut(&id) {
                d.template = t;
            }
            return Ok(OkVal::Int(id));
        }
        "one.document.update" => {
            // SharedAPI::update with DocumentAPI's auth op MANAGE: a lock at USE or MANAGE
            // level refuses it to everyone, the lock's owner and oneadmin included.
            let id = f(p.int(1))?;
            let text = f(p.str(2))?.to_string();
            let kind = f(p.opt_int(3, 0))?;
            let d = e(st.docs.get(&id).ok_or_else(|| no_exists("document", id)))?;
            e(st.authorize(uid, &d.own, Op::Manage, "document"))?;
            e(lock_blocks(d.lock.as_ref(), MANAGE_OP, uid, id))?;
            if kind != 0 && kind != 1 {
                return Err(Ok(err(RPC_API, "Wrong update type").with_id(id)));
            }
            let mut new =
                e(Template::parse(&text).map_err(|m| err(crate::state::INTERNAL, m).with_id(id)))?;
            new.remove("NAME");
            let d = e(st
                .docs
                .get_mut(&id)
                .ok_or_else(|| no_exists("document", id)))?;
            if kind == 0 {
                d.template = new;
            } else {
                d.template.merge(&new);
            }
            st.dirty = true;
            return Ok(OkVal::Int(id));
        }
        "one.document.lock" => {
            // SharedAPI::lock + PoolObjectSQL::lock_db (see docs/upstream-notes.md): the
            // lock's owner is the *user*; `test` refuses any existing lock (the message is
            // the lock's TIME); without it the same user (or an admin) re-locks and
            // overrides level, owner and time.
            let id = f(p.int(1))?;
            let level = f(p.int(2))?;
            let test = f(p.opt_bool(3, false))?;
            let own = e(st.docs.get(&id).ok_or_else(|| no_exists("document", id)))?
                .own
                .clone();
            e(st.authorize(uid, &own, Op::Manage, "document"))?;
            let level = match level {
                1 | 4 => 1,
                2 => 2,
                3 => 3,
                _ => return Err(Ok(err(ACTION, "Wrong lock level specified"))),
            };
            let admin = st.is_admin(uid);
            let d = e(st
                .docs
                .get_mut(&id)
                .ok_or_else(|| no_exists("document", id)))?;
            if let (Some(l), true) = (&d.lock, test) {
                return Err(Ok(err(ACTION, l.time.to_string())));
            }
            if d.lock.as_ref().is_some_and(|l| l.owner != uid) && !admin {
                return Err(Ok(err(ACTION, "Error trying to lock the resource.")));
            }
            d.lock = Some(crate::state::Lock {
                level,
                owner: uid,
                time: epoch_s(),
            });
            st.dirty = true;
            return Ok(OkVal::Int(id));
        }
        "one.document.unlock" => {
            // SharedAPI::unlock + unlock_db: only the lock's owner (user) or an admin; an
            // unlocked object has owner -1, so a non-admin's unlock of it fails too.
            let id = f(p.int(1))?;
            let own = e(st.docs.get(&id).ok_or_else(|| no_exists("document", id)))?
                .own
                .clone();
            e(st.authorize(uid, &own, Op::Manage, "document"))?;
            let admin = st.is_admin(uid);
            let d = e(st
                .docs
                .get_mut(&id)
                .ok_or_else(|| no_exists("document", id)))?;
            let lock_owner = d.lock.as_ref().map_or(-1, |l| l.owner);
            if !admin && lock_owner != uid {
                return Err(Ok(err(
                    ACTION,
                    "Cannot unlock: Lock is owned by another user",
                )));
            }
            d.lock = None;
            st.dirty = true;
            return Ok(OkVal::Int(id));
        }
        "one.documentpool.info" => {
            let (filter, start, end, ty) = (f(p.int(1))?, f(p.int(2))?, f(p.int(3))?, f(p.int(4))?);
            e(check_filter(filter))?;
            out.push_str("<DOCUMENT_POOL>");
            let it = st
                .docs
                .values()
                .filter(|d| st.visible(uid, filter, &d.own) && (ty < 0 || d.doc_type == ty));
            for d in range(it, |d| d.id, start, end) {
                render::document(&mut out, d);
            }
            out.push_str("</DOCUMENT_POOL>");
        }
        other => {
            return Err(Err(Resp::Fault {
                code: FAULT_NO_METHOD,
                msg: format!("Requested method '{other}' does not exist"),
            }))
        }
    }
    Ok(OkVal::Str(out))
}

/// `AuthRequest::MANAGE` (lockable).
const MANAGE_OP: i64 = 0x2;

/// `AclManager::authorize`: a lock at level L refuses lockable operations whose code is
/// ≥ L (USE 1, MANAGE 2, ADMIN 4), for every user. The message is `AuthRequest::add_auth`'s.
fn lock_blocks(
    lock: Option<&crate::state::Lock>,
    op: i64,
    uid: i64,
    id: i64,
) -> Result<(), OneErr> {
    match lock {
        Some(l) if l.level > 0 && l.level <= op => Err(err(
            AUTHORIZATION,
            format!("User [{uid}] : DOCUMENT is locked. [{id}]."),
        )),
        _ => Ok(()),
    }
}

fn check_filter(filter: i64) -> Result<(), OneErr> {
    if filter < -4 {
        Err(err(RPC_API, "Incorrect filter_flag"))
    } else {
        Ok(())
    }
}

/// ID range (end >= -1) or pagination (end < -1: offset `start`, page size `-end`).
fn range<'a, T: 'a>(
    it: impl Iterator<Item = &'a T> + 'a,
    id: impl Fn(&T) -> i64 + 'a,
    start: i64,
    end: i64,
) -> Box<dyn Iterator<Item = &'a T> + 'a> {
    if end < -1 {
        Box::new(it.skip(start.max(0) as usize).take((-end) as usize))
    } else {
        Box::new(it.filter(move |x| {
            let i = id(x);
            (start < 0 || i >= start) && (end == -1 || i <= end)
        }))
    }
}
