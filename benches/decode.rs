//! Single-core costs on the hot path: decoding CloudEvents JSON and appending Arrow rows.
//!
//! `cargo bench --bench decode`

use std::hint::black_box;

use chrono::NaiveDate;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tally::workload::{Spec, generate};
use tally_core::{Decision, DecodeLimits, Frame};
use tally_ingest::rows::Rows;

fn messages(batch: usize) -> Vec<bytes::Bytes> {
    let mut spec = Spec::new(10_000, NaiveDate::from_ymd_opt(2026, 11, 1).unwrap());
    spec.batch = batch;
    spec.customers = 10;
    generate(&spec).0.into_iter().map(|m| m.payload).collect()
}

fn decode(c: &mut Criterion) {
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("decode");
    for batch in [1, 100] {
        let msgs = messages(batch);
        group.throughput(Throughput::Elements(10_000));
        group.bench_function(format!("frames_of_{batch}"), |b| {
            b.iter(|| {
                let mut n = 0;
                for m in &msgs {
                    n += Frame::decode(black_box(m), &limits).unwrap().events.len();
                }
                n
            })
        });
        group.bench_function(format!("frames_of_{batch}_to_arrow"), |b| {
            let mut rows = Rows::default();
            b.iter(|| {
                for m in &msgs {
                    for e in Frame::decode(black_box(m), &limits).unwrap().events {
                        rows.push(&e.unwrap(), Decision::Accepted, None, 0, 1, 0);
                    }
                }
                rows.finish().num_rows()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
