//! Scale: 1,000 services / 20,000 VMs in memory. Measures a full paged walk of
//! `one.vmpool.infoextended` (100 pages of 200 full bodies, envelope included), one page, and one
//! OneFlow engine pass over the 1,000 services.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use onesim::state::{State, L_RUNNING, S_ACTIVE};
use onesim::xmlrpc::{self, XVal};
use serde_json::json;

const SERVICES: i64 = 1_000;
const PER_SERVICE: i64 = 20;
const PAGE: i64 = 200;

fn populated() -> State {
    let mut st = State::new("oneadmin", "pw");
    st.knobs.onegate_endpoint = "http://127.0.0.1:5030".into();
    st.alloc_vnet(
        "NAME=net\nVN_MAD=bridge\nBRIDGE=br0\nAR=[TYPE=IP4,IP=10.0.0.1,SIZE=65000]",
        0,
    )
    .unwrap();
    let tid = st
        .alloc_template("NAME=node\nCPU=1\nVCPU=1\nMEMORY=1024\nNIC=[NETWORK_ID=0]\nCONTEXT=[NETWORK=YES,TOKEN=YES,ONEAPP_FL=\"1\"]", 0)
        .unwrap();
    for s in 0..SERVICES {
        let mut nodes = Vec::new();
        for n in 0..PER_SERVICE {
            let role = if n == 0 { "superlink" } else { "supernode" };
            let extra = format!("SERVICE_ID={s}\nROLE_NAME={role}\nREADY=YES\nFL_HEARTBEAT=\"2026-01-01T00:00:00Z\"");
            let id = st
                .instantiate(tid, &format!("{role}_{n}_(service_{s})"), false, &extra, 0)
                .unwrap();
            st.set_state(id, S_ACTIVE, L_RUNNING);
            nodes.push(json!({"deploy_id": id, "vm_info": {"VM": {"ID": id.to_string()}}}));
        }
        let body = json!({"name": format!("svc{s}"), "state": 2, "deployment": "straight", "roles": [
            {"name": "superlink", "state": 2, "cardinality": 1, "nodes": nodes[..1]},
            {"name": "supernode", "state": 2, "cardinality": PER_SERVICE - 1, "parents": ["superlink"], "nodes": nodes[1..]}]});
        st.alloc_doc(&format!("svc{s}"), 100, body, 0);
    }
    st.effects.clear();
    st
}

fn page(st: &mut State, offset: i64) -> String {
    let params = [
        XVal::Str("oneadmin:pw".into()),
        XVal::Int(-2),
        XVal::Int(offset),
        XVal::Int(-PAGE),
        XVal::Int(-1),
    ];
    xmlrpc::render(&onesim::oned::dispatch(
        st,
        "one.vmpool.infoextended",
        &params,
        0,
    ))
}

fn bench(c: &mut Criterion) {
    let mut st = populated();
    assert_eq!(st.vms.len() as i64, SERVICES * PER_SERVICE);
    let bytes: usize = (0..SERVICES * PER_SERVICE / PAGE)
        .map(|p| page(&mut st, p * PAGE).len())
        .sum();
    println!(
        "20,000 VMs: paged walk returns {:.1} MiB of XML-RPC responses",
        bytes as f64 / 1048576.0
    );
    let mut g = c.benchmark_group("scale");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function(
        "vmpool.infoextended full paged walk (20k VMs, 100 pages of 200)",
        |b| {
            b.iter(|| {
                for p in 0..SERVICES * PER_SERVICE / PAGE {
                    black_box(page(&mut st, p * PAGE));
                }
            })
        },
    );
    g.bench_function("vmpool.infoextended last page (offset 19800)", |b| {
        b.iter(|| black_box(page(&mut st, 19_800)))
    });
    g.bench_function("OneFlow engine pass (1,000 services)", |b| {
        b.iter(|| onesim::flow::step(&mut st, Duration::from_secs(300)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
