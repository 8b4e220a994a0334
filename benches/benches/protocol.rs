//! Frame encode/decode benchmarks.
#![allow(missing_docs)]

use backbone_protocol::bytes::{Blob, MessageId};
use backbone_protocol::codec::{Phase, decode_frame, encode_frame};
use backbone_protocol::frame::{Deliver, Send};
use backbone_protocol::{Address, Frame};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn frames(c: &mut Criterion) {
    let send = Frame::Send(Send {
        request_id: 1,
        ttl_secs: 3600,
        recipients: vec![Address([7; 32])],
        envelope: Blob::from(vec![0xab; 1024]),
    });
    let deliver = Frame::Deliver(Deliver {
        seq: 42,
        message_id: MessageId([1; 16]),
        sender: Some(Address([2; 32])),
        stored_at_ms: 1,
        expires_at_ms: 2,
        envelope: Blob::from(vec![0xcd; 1024]),
    });
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    for (name, frame) in [("send_1k", &send), ("deliver_1k", &deliver)] {
        let mut buf = Vec::with_capacity(2048);
        group.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| {
                buf.clear();
                encode_frame(black_box(frame), &mut buf).expect("encodes");
            })
        });
        let bytes = backbone_protocol::codec::frame_to_vec(frame).expect("encodes");
        group.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| decode_frame(black_box(&bytes), 1 << 20, Phase::Any).expect("decodes"))
        });
    }
    group.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
