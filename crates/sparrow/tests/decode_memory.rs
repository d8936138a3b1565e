//! A DSA decode step at 131072 cached tokens runs in the memory predicted for it: the
//! caches hold exactly S * (KV bytes + index bytes) per token, and the step itself
//! allocates only O(k) scratch (top-k buffers, the gathered rows), nothing that grows
//! with S: no score row, no copy of the cache. Bytes are counted by a global allocator
//! wrapper in this test binary; nothing here is timed.

use sparrow::bench::attention::{DecodeState, LayerShape};
use sparrow::kernels::indexer::KeyPrecision;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates every call to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::SeqCst) + new_size
                - layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        } else {
            CURRENT.fetch_sub(layout.size() - new_size, Ordering::SeqCst);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_step_at_131072_tokens_uses_the_predicted_memory() {
    let s = 131_072usize;
    for precision in [KeyPrecision::F32, KeyPrecision::Bf16, KeyPrecision::Int8] {
        let shape = LayerShape {
            index_precision: precision,
            ..LayerShape::default()
        };
        let st = DecodeState::random(shape, s, 0, 3).unwrap();
        // Cache: K and V (MQA: one head) plus one index key per token, nothing else.
        let predicted_cache = s * (shape.kv_bytes_per_token() + shape.index_bytes_per_token());
        assert_eq!(st.cache_bytes(), predicted_cache);
        assert_eq!(shape.kv_bytes_per_token(), 2 * 64 * 4);
        assert_eq!(
            shape.mha_kv_bytes_per_token(),
            16 * shape.kv_bytes_per_token()
        );

        // Warm up (thread pool start-up allocates once).
        let _ = st.sparse();
        let threads = rayon::current_num_threads();
        let k = shape.topk;
        // Scratch predicted for one step: a top-k buffer of 2k (score, position) pairs
        // per scan part and for the merge, the k selected positions, the gathered K and V
        // rows (k x D each), the queries transposed into 16-lane rows and the output,
        // plus 64 KiB for the thread pool's job bookkeeping.
        let predicted_step = (threads + 2) * 2 * k * 8
            + k * 4
            + 2 * k * shape.head_dim * 4
            + 2 * shape.head_dim * 64
            + shape.heads * shape.head_dim * 4
            + (64 << 10);
        let base = CURRENT.load(Ordering::SeqCst);
        PEAK.store(base, Ordering::SeqCst);
        let out = st.sparse();
        let step_peak = PEAK.load(Ordering::SeqCst) - base;
        assert_eq!(out.len(), shape.heads * shape.head_dim);
        assert!(out.iter().all(|x| x.is_finite()));
        assert!(
            step_peak <= predicted_step,
            "{precision:?}: the decode step allocated {step_peak} B at peak, predicted at most {predicted_step} B"
        );
        // Nothing proportional to the context: under 1% of the cache.
        assert!(
            step_peak * 100 < predicted_cache,
            "{step_peak} B vs cache {predicted_cache} B"
        );
        // The dense step, for contrast, also stays O(H * D) per thread.
        let base = CURRENT.load(Ordering::SeqCst);
        PEAK.store(base, Ordering::SeqCst);
        let _ = st.dense();
        let dense_peak = PEAK.load(Ordering::SeqCst) - base;
        assert!(
            dense_peak * 100 < predicted_cache,
            "dense step {dense_peak} B"
        );
        println!("{precision:?}: cache {predicted_cache} B, sparse step peak {step_peak} B (predicted <= {predicted_step}), dense step peak {dense_peak} B");
    }
}
