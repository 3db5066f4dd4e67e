//! Criterion benchmark of one forward+backward step of the MoE-Transformer against a dense transformer
//! of equal active parameters (same code, `moe_every = 0`, one FFN of hidden `k n`), at sizes small
//! enough for a quick run; `moe-dmft bench` runs the full-size comparison.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moe_dmft::model::transformer::{random_tokens, MoeTransformer, TransformerConfig};
use moe_dmft::model::Model;
use moe_dmft::param::{ParamConfig, Sizes};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const BATCH: usize = 8;
const SEQ: usize = 32;

fn config(sizes: Sizes, moe_every: usize) -> TransformerConfig {
    TransformerConfig {
        vocab: 65,
        seq_len: SEQ,
        sizes,
        n_head: 4,
        moe_every,
        ..TransformerConfig::default()
    }
}

fn step(c: &mut Criterion) {
    let moe = Sizes {
        width: 64,
        depth: 2,
        experts: 8,
        active: 2,
        expert_hidden: 64,
    };
    let dense = Sizes {
        experts: 1,
        active: 1,
        expert_hidden: moe.active * moe.expert_hidden,
        ..moe
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("thread pool");
    let mut group = c.benchmark_group("transformer_step_f32");
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    group.sample_size(20);
    for (name, sizes, moe_every) in [("moe", moe, 1), ("dense", dense, 0)] {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let hp = ParamConfig::default().resolve(&sizes).expect("valid sizes");
        let model = MoeTransformer::<f32>::new(&config(sizes, moe_every), &hp, &mut rng).expect("valid config");
        let batch = random_tokens(BATCH, SEQ, 65, &mut rng);
        group.bench_function(BenchmarkId::new(name, "2 threads"), |b| {
            b.iter(|| pool.install(|| model.loss_and_grad(&batch, &mut rng).expect("step")))
        });
    }
    group.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
