//! The metrics recorder must not keep histogram samples while nobody scrapes: every
//! webhook records its publish-ack time, and ingest need not be scraped at all.
//!
//! Its own test binary, for its allocator: the live heap is counted exactly.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const SAMPLES: usize = 1_000_000;

#[test]
fn unscraped_histogram_samples_are_folded_and_freed() {
    hookyard_core::metrics::install();
    let histogram = metrics::histogram!(hookyard_core::metrics::names::PUBLISH_ACK_SECONDS);
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..SAMPLES {
        histogram.record((i % 1000) as f64 / 1e6);
    }
    let grown = LIVE.load(Ordering::Relaxed) - before;
    // About 16 bytes per sample while they wait to be folded: the check below can fail.
    assert!(
        grown > (SAMPLES * 4) as isize,
        "recording {SAMPLES} samples grew the heap by only {grown} bytes"
    );
    let bound = hookyard_core::metrics::UPKEEP_EVERY * 4;
    let start = Instant::now();
    loop {
        // A live process keeps recording, and that is what frees drained samples: the
        // recorder defers freeing them until its epoch moves on.
        for _ in 0..100 {
            histogram.record(0.001);
        }
        let held = LIVE.load(Ordering::Relaxed) - before;
        if held < (SAMPLES / 10) as isize {
            break;
        }
        assert!(
            start.elapsed() < bound,
            "{held} bytes of {SAMPLES} histogram samples still held after {bound:?} without a scrape"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
