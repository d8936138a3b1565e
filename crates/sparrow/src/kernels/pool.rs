//! The parallel loop of the inference kernels: a fixed team of worker threads that
//! spin between calls, so the hundreds of short parallel products and scans of one
//! decode step each start in about a microsecond.
//!
//! Why not rayon here: a decode step of a small model is a chain of parallel calls of
//! 10-200 us separated by short serial stretches. Rayon's idle workers sleep after a
//! few dozen yields, and waking one costs 40-70 us on this kind of virtual machine
//! (measured: a loop of 20 us serial + 2 x 25 us parallel took 86 us per iteration
//! under rayon, 47 us here, 45 ideal); sparrow-small decoded faster on one thread than
//! on two. Here the caller runs tasks itself, the workers spin on one atomic word for
//! [`SPIN`] after their last task (then yield, then park), and a task is claimed by one
//! compare-and-swap. Training keeps rayon (long calls, where wake-up is amortised).
//!
//! Rules: a call made from inside a task (nested parallelism) runs serially on that
//! thread; a call made while another thread holds the team also runs serially (tests
//! in parallel, rayon workers): no call ever waits for the team to be free, so nothing
//! can deadlock. A panic inside a task is carried to the caller once every task has
//! ended.

use std::any::Any;
use std::cell::Cell;
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins (then yields) before it parks.
const SPIN: Duration = Duration::from_micros(400);
/// Busy-wait rounds before an idle worker starts yielding its core.
const SPIN_ROUNDS: u32 = 2_000;

/// Bits of the job word: epoch (24) | task count (20) | next task (20).
const IDX_BITS: u32 = 20;
/// Most tasks one job holds; larger calls give each task a run of indices.
const MAX_TASKS: usize = (1 << IDX_BITS) - 1;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;

fn pack(epoch: u64, n: usize, next: usize) -> u64 {
    (epoch << (2 * IDX_BITS)) | ((n as u64) << IDX_BITS) | next as u64
}

/// (epoch, task count, next task) of a job word.
fn unpack(s: u64) -> (u64, usize, usize) {
    (
        s >> (2 * IDX_BITS),
        ((s >> IDX_BITS) & IDX_MASK) as usize,
        (s & IDX_MASK) as usize,
    )
}

/// The task function of the running job, as the caller holds it.
type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Team {
    /// Worker threads (the caller is the team's other member).
    workers: usize,
    /// The job word: which job, how many tasks, the next unclaimed one.
    state: AtomicU64,
    /// Address of the caller's [`Task`] for the current job.
    task: AtomicUsize,
    /// Tasks of the current job that have ended.
    done: AtomicUsize,
    /// Held by the thread whose job the team runs.
    busy: AtomicBool,
    /// Epoch of the last job (only the holder of `busy` changes it).
    epoch: AtomicU64,
    /// Workers parked on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// The first panic of the current job's tasks.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

thread_local! {
    /// True on worker threads, and on the caller while it runs its job's tasks.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

static TEAM: OnceLock<&'static Team> = OnceLock::new();

/// Threads a parallel call uses: rayon's count where the team is first used (the CLI
/// pins it to the machine's cores; `RAYON_NUM_THREADS` sets it).
pub fn threads() -> usize {
    team().workers + 1
}

fn team() -> &'static Team {
    TEAM.get_or_init(|| {
        let workers = rayon::current_num_threads().max(1) - 1;
        let team: &'static Team = Box::leak(Box::new(Team {
            workers,
            state: AtomicU64::new(0),
            task: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            panic: Mutex::new(None),
        }));
        for i in 0..workers {
            let spawned = std::thread::Builder::new()
                .name(format!("sparrow-kernel-{i}"))
                .spawn(move || team.work());
            if spawned.is_err() {
                // Fewer workers than counted only means fewer hands: the caller claims
                // every task nobody else does.
                break;
            }
        }
        team
    })
}

impl Team {
    /// Claim the next task of the job whose word is `s`, or None when it has none left
    /// (or the word changed: the caller reloads it).
    fn claim(&self, s: u64) -> Option<usize> {
        let (epoch, n, next) = unpack(s);
        if next >= n {
            return None;
        }
        self.state
            .compare_exchange_weak(
                s,
                pack(epoch, n, next + 1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .ok()
            .map(|_| next)
    }

    /// Run task `i` of the current job (claimed by this thread, so the job's caller is
    /// still waiting and its task function alive).
    fn run_task(&self, i: usize) {
        // SAFETY: `task` holds the address of the caller's `Task`, written before the
        // job word was published; a claimed index keeps the caller inside `run` (it
        // waits for `done` to reach the task count), so the reference is live.
        let f: Task = unsafe { *(self.task.load(Ordering::Acquire) as *const Task) };
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
            let mut first = self.panic.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert(p);
        }
        self.done.fetch_add(1, Ordering::AcqRel);
    }

    /// Claim and run tasks of the current job until none is left.
    fn drain(&self) {
        loop {
            let s = self.state.load(Ordering::Acquire);
            let (_, n, next) = unpack(s);
            if next >= n {
                return;
            }
            if let Some(i) = self.claim(s) {
                self.run_task(i);
            }
        }
    }

    /// A worker's life: spin for work, run it, park when idle for long.
    fn work(&self) {
        IN_TASK.with(|t| t.set(true));
        loop {
            self.drain();
            let idle = Instant::now();
            let mut rounds = 0u32;
            loop {
                let (_, n, next) = unpack(self.state.load(Ordering::Acquire));
                if next < n {
                    break;
                }
                rounds += 1;
                if rounds < SPIN_ROUNDS {
                    std::hint::spin_loop();
                } else if idle.elapsed() < SPIN {
                    std::thread::yield_now();
                } else {
                    self.park();
                    break;
                }
            }
        }
    }

    /// Sleep until a job with unclaimed tasks is published.
    fn park(&self) {
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        loop {
            let (_, n, next) = unpack(self.state.load(Ordering::SeqCst));
            if next < n {
                break;
            }
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Run `f(0..n)` with the workers; the caller holds `busy`.
    fn run(&self, n: usize, f: Task) {
        self.task
            .store(&f as *const Task as usize, Ordering::Release);
        self.done.store(0, Ordering::Release);
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        self.state.store(pack(epoch, n, 0), Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        IN_TASK.with(|t| t.set(true));
        self.drain();
        IN_TASK.with(|t| t.set(false));
        // Tasks other threads claimed: wait for them (they are running, not queued).
        let mut rounds = 0u32;
        while self.done.load(Ordering::Acquire) < n {
            rounds += 1;
            if rounds < SPIN_ROUNDS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let panic = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.busy.store(false, Ordering::Release);
        if let Some(p) = panic {
            resume_unwind(p);
        }
    }
}

/// Run `f(i)` for every `i` in `0..n`, in parallel where the team is free (each index
/// exactly once, in no particular order). Returns when every call has returned.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    if n == 0 {
        return;
    }
    let serial = n == 1 || IN_TASK.with(Cell::get);
    let team = if serial { None } else { Some(team()) };
    let Some(team) = team.filter(|t| {
        t.workers > 0
            && t.busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
    }) else {
        (0..n).for_each(f);
        return;
    };
    if n <= MAX_TASKS {
        team.run(n, &f);
    } else {
        let per = n.div_ceil(MAX_TASKS);
        team.run(n.div_ceil(per), &|t| {
            (t * per..((t + 1) * per).min(n)).for_each(&f)
        });
    }
}

/// `f(i)` for every `i` in `0..n`, in parallel as [`for_each`], collected in index
/// order.
pub fn map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let mut out: Vec<MaybeUninit<T>> = Vec::with_capacity(n);
    out.resize_with(n, MaybeUninit::uninit);
    let slots = Slots(out.as_mut_ptr());
    for_each(n, |i| {
        // SAFETY: `for_each` calls each index once, so each slot is written by one
        // task only, and `out` outlives the call.
        unsafe { slots.get(i).write(MaybeUninit::new(f(i))) };
    });
    // Every slot was written (a panic would have left through `for_each`, leaking
    // the written values, never reading an unwritten one).
    out.into_iter()
        // SAFETY: see above: every index ran to completion.
        .map(|v| unsafe { v.assume_init() })
        .collect()
}

/// `f(i, &mut items[i])` for every item, in parallel as [`for_each`].
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(usize, &mut T) + Sync) {
    let slots = Slots(items.as_mut_ptr());
    for_each(items.len(), |i| {
        // SAFETY: each index is visited once, so the references are disjoint; `items`
        // is borrowed mutably for the whole call.
        f(i, unsafe { &mut *slots.get(i) })
    });
}

/// `f(i, chunk)` for the `i`-th `len`-long chunk of `items` (the last may be
/// shorter), in parallel as [`for_each`].
pub fn for_each_chunk_mut<T: Send>(
    items: &mut [T],
    len: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let len = len.max(1);
    let total = items.len();
    let slots = Slots(items.as_mut_ptr());
    for_each(total.div_ceil(len), |i| {
        let start = i * len;
        let n = len.min(total - start);
        // SAFETY: chunk `i` covers `start..start + n` of `items`, disjoint from every
        // other chunk and in bounds; `items` is borrowed mutably for the whole call.
        f(i, unsafe {
            std::slice::from_raw_parts_mut(slots.get(start), n)
        })
    });
}

/// A base pointer that tasks index disjointly.
struct Slots<T>(*mut T);

// SAFETY: tasks only reach disjoint elements through it (see the callers), and the
// elements are `Send`.
unsafe impl<T: Send> Sync for Slots<T> {}

impl<T> Slots<T> {
    /// # Safety
    /// `i` is in bounds of the slice the pointer came from.
    unsafe fn get(&self, i: usize) -> *mut T {
        unsafe { self.0.add(i) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_index_runs_once_and_map_keeps_order() {
        for n in [0, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            for_each(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            let squares = map(n, |i| i * i);
            assert_eq!(squares, (0..n).map(|i| i * i).collect::<Vec<_>>());
        }
    }

    #[test]
    fn nested_and_concurrent_calls_complete() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        for_each(8, |_| {
                            for_each(3, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            })
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 50 * 8 * 3);
    }

    #[test]
    fn items_are_handed_out_mutably() {
        let mut v: Vec<usize> = vec![0; 257];
        for_each_mut(&mut v, |i, x| *x = 3 * i);
        assert!(v.iter().enumerate().all(|(i, &x)| x == 3 * i));
        for len in [1, 5, 256, 257, 300] {
            let mut w: Vec<usize> = vec![0; 257];
            for_each_chunk_mut(&mut w, len, |c, chunk| {
                for (j, x) in chunk.iter_mut().enumerate() {
                    *x = c * len + j + 1;
                }
            });
            assert!(w.iter().enumerate().all(|(i, &x)| x == i + 1), "len {len}");
        }
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_recovers() {
        let r = catch_unwind(|| {
            for_each(64, |i| {
                if i == 40 {
                    panic!("task 40");
                }
            })
        });
        assert!(r.is_err());
        assert_eq!(map(5, |i| i + 1), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn calls_after_the_workers_parked_still_run() {
        assert_eq!(map(4, |i| i), vec![0, 1, 2, 3]);
        std::thread::sleep(SPIN * 3);
        assert_eq!(map(4, |i| 2 * i), vec![0, 2, 4, 6]);
    }
}
