/* microtile's own thread pool (see _pool.pxd for the contract).
 *
 * Why not an OpenMP parallel region: its end is a join, so the calling thread waits for every
 * member of the team, including one that the OS has not run yet because another process (or
 * OpenBLAS's spinning workers) holds its core; on two cores that turned a 256^3 product into a
 * wait of a whole time slice.  Here the caller only waits for helpers that actually joined the
 * job and are inside it; a helper that wakes up after the work is gone finds the gate closed
 * and goes back to sleep without touching the job.
 *
 * Helpers spin briefly after a job (so back-to-back calls, as in a training step, do not pay
 * a wake-up each), then sleep on a condition variable, leaving the core to whoever wants it.
 *
 * State shared between threads is accessed with GCC/clang atomic builtins.  Jobs are
 * serialised: a second caller finding the pool busy runs its job alone (tid 0), which is what
 * the work-claiming tasks are written for anyway.
 */
#ifndef MICROTILE_MT_POOL_H
#define MICROTILE_MT_POOL_H

#include <stdint.h>

typedef void (*mt_task_fn)(void* ctx, int tid);

#if defined(__unix__) || defined(__APPLE__)
#define MT_POOL_THREADS 1
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define MT_PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define MT_PAUSE() __asm__ __volatile__("yield")
#else
#define MT_PAUSE() do { } while (0)
#endif

#define MT_POOL_MAX_HELPERS 255
#define MT_GATE_OPEN (1 << 30)

typedef struct {
    pthread_mutex_t lock;      /* guards sleepers, n_helpers and the wake-ups */
    pthread_cond_t wake;
    int n_helpers;             /* helper threads started */
    int sleepers;              /* helpers blocked in pthread_cond_wait */
    int64_t seq;               /* job counter; a helper waits for it to change */
    int gate;                  /* MT_GATE_OPEN while a job takes helpers | helpers inside */
    int joined;                /* helpers that took a thread number in the current job */
    int width;                 /* threads the current job may use, the caller included */
    int busy;                  /* 1 while a caller owns the pool */
    mt_task_fn fn;
    void* ctx;
    int64_t spin_ns;           /* how long an idle helper spins before it sleeps */
    int64_t jobs, helped;      /* jobs run on the pool, helper joins (diagnostics) */
    int64_t waited_ns;         /* callers' time waiting for helpers at the end of jobs */
} mt_pool_t;

static mt_pool_t mt_pool = {
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    /* 100 us: longer than the Python between two layers' calls in a training step
       (10-60 us measured), far shorter than OpenBLAS's ~0.1 s, so an idle microtile takes
       nothing from NumPy's workers. */
    100000, 0, 0, 0
};

static int64_t mt_pool_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + (int64_t)ts.tv_nsec;
}

/* Enter the open job if there is one, run the task, leave. */
static void mt_pool_join(void) {
    int g = __atomic_load_n(&mt_pool.gate, __ATOMIC_ACQUIRE);
    int tid;
    for (;;) {
        if (!(g & MT_GATE_OPEN)) return;
        if (__atomic_compare_exchange_n(&mt_pool.gate, &g, g + 1, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            break;
    }
    /* Inside: fn, ctx and width were written before the gate opened (release) and stay
       until the caller has seen this helper leave. */
    tid = __atomic_add_fetch(&mt_pool.joined, 1, __ATOMIC_RELAXED);
    if (tid < mt_pool.width) {
        __atomic_add_fetch(&mt_pool.helped, 1, __ATOMIC_RELAXED);
        mt_pool.fn(mt_pool.ctx, tid);
    }
    __atomic_sub_fetch(&mt_pool.gate, 1, __ATOMIC_RELEASE);
}

static void* mt_pool_helper(void* arg) {
    int64_t seen = (int64_t)(intptr_t)arg, s, t0;
    unsigned spins;
    for (;;) {
        t0 = mt_pool_now_ns();
        spins = 0;
        while ((s = __atomic_load_n(&mt_pool.seq, __ATOMIC_ACQUIRE)) == seen) {
            MT_PAUSE();
            if ((++spins & 63) == 0 &&
                mt_pool_now_ns() - t0 > __atomic_load_n(&mt_pool.spin_ns, __ATOMIC_RELAXED)) {
                pthread_mutex_lock(&mt_pool.lock);
                mt_pool.sleepers++;
                while ((s = __atomic_load_n(&mt_pool.seq, __ATOMIC_ACQUIRE)) == seen)
                    pthread_cond_wait(&mt_pool.wake, &mt_pool.lock);
                mt_pool.sleepers--;
                pthread_mutex_unlock(&mt_pool.lock);
                break;
            }
        }
        seen = s;
        mt_pool_join();
    }
    return NULL;
}

/* Start helpers until there are `want` (under the lock).  Returns how many exist. */
static int mt_pool_grow(int want) {
    pthread_attr_t attr;
    pthread_t th;
    sigset_t all, old;
    int n;
    if (want > MT_POOL_MAX_HELPERS) want = MT_POOL_MAX_HELPERS;
    pthread_mutex_lock(&mt_pool.lock);
    if (mt_pool.n_helpers < want && pthread_attr_init(&attr) == 0) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        /* Signals belong to the interpreter's main thread: helpers never run handlers. */
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        while (mt_pool.n_helpers < want) {
            if (pthread_create(&th, &attr, mt_pool_helper,
                               (void*)(intptr_t)__atomic_load_n(&mt_pool.seq, __ATOMIC_ACQUIRE)) != 0)
                break;
            mt_pool.n_helpers++;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);
    }
    n = mt_pool.n_helpers;
    pthread_mutex_unlock(&mt_pool.lock);
    return n;
}

/* Run fn(ctx, 0) on the calling thread and fn(ctx, t), 0 < t < nt, on the helpers that join
   while the caller works.  Returns when the caller's part is done and no helper is inside. */
static int mt_pool_run(int nt, mt_task_fn fn, void* ctx) {
    int helpers, joined, spins = 0, expect = 0;
    if (nt > 1 && __atomic_compare_exchange_n(&mt_pool.busy, &expect, 1, 0, __ATOMIC_ACQUIRE,
                                              __ATOMIC_RELAXED)) {
        helpers = mt_pool.n_helpers >= nt - 1 ? mt_pool.n_helpers : mt_pool_grow(nt - 1);
        if (helpers > 0) {
            mt_pool.fn = fn;
            mt_pool.ctx = ctx;
            mt_pool.width = nt;
            __atomic_store_n(&mt_pool.joined, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&mt_pool.gate, MT_GATE_OPEN, __ATOMIC_RELEASE);
            __atomic_add_fetch(&mt_pool.seq, 1, __ATOMIC_RELEASE);
            __atomic_add_fetch(&mt_pool.jobs, 1, __ATOMIC_RELAXED);
            pthread_mutex_lock(&mt_pool.lock);
            if (mt_pool.sleepers)
                pthread_cond_broadcast(&mt_pool.wake);
            pthread_mutex_unlock(&mt_pool.lock);
            fn(ctx, 0);
            __atomic_and_fetch(&mt_pool.gate, ~MT_GATE_OPEN, __ATOMIC_ACQ_REL);
            /* Helpers still inside are running the task's last claimed work. */
            if (__atomic_load_n(&mt_pool.gate, __ATOMIC_ACQUIRE) != 0) {
                int64_t t0 = mt_pool_now_ns();
                while (__atomic_load_n(&mt_pool.gate, __ATOMIC_ACQUIRE) != 0) {
                    if (++spins < 4096) MT_PAUSE(); else sched_yield();
                }
                __atomic_add_fetch(&mt_pool.waited_ns, mt_pool_now_ns() - t0, __ATOMIC_RELAXED);
            }
            joined = __atomic_load_n(&mt_pool.joined, __ATOMIC_RELAXED);
            __atomic_store_n(&mt_pool.busy, 0, __ATOMIC_RELEASE);
            return 1 + (joined < nt - 1 ? joined : nt - 1);
        }
        __atomic_store_n(&mt_pool.busy, 0, __ATOMIC_RELEASE);
    }
    fn(ctx, 0);
    return 1;
}

/* A forked child has none of its parent's threads: start from an empty pool (new helpers
   are created on demand), with fresh synchronisation objects. */
static void mt_pool_after_fork_child(void) {
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    mt_pool.lock = m;
    mt_pool.wake = c;
    mt_pool.n_helpers = 0;
    mt_pool.sleepers = 0;
    mt_pool.gate = 0;
    mt_pool.joined = 0;
    mt_pool.busy = 0;
}

static int mt_pool_init(void) {
    return pthread_atfork(NULL, NULL, mt_pool_after_fork_child);
}

static int mt_pool_helpers(void) { return __atomic_load_n(&mt_pool.n_helpers, __ATOMIC_RELAXED); }
static int64_t mt_pool_get_spin_ns(void) { return __atomic_load_n(&mt_pool.spin_ns, __ATOMIC_RELAXED); }
static void mt_pool_set_spin_ns(int64_t ns) { __atomic_store_n(&mt_pool.spin_ns, ns, __ATOMIC_RELAXED); }
static int64_t mt_pool_jobs(void) { return __atomic_load_n(&mt_pool.jobs, __ATOMIC_RELAXED); }
static int64_t mt_pool_helped(void) { return __atomic_load_n(&mt_pool.helped, __ATOMIC_RELAXED); }
static int64_t mt_pool_waited_ns(void) { return __atomic_load_n(&mt_pool.waited_ns, __ATOMIC_RELAXED); }

#else  /* no POSIX threads: every job runs on the calling thread */
#define MT_POOL_THREADS 0
static int mt_pool_run(int nt, mt_task_fn fn, void* ctx) { (void)nt; fn(ctx, 0); return 1; }
static int mt_pool_init(void) { return 0; }
static int mt_pool_helpers(void) { return 0; }
static int64_t mt_pool_get_spin_ns(void) { return 0; }
static void mt_pool_set_spin_ns(int64_t ns) { (void)ns; }
static int64_t mt_pool_jobs(void) { return 0; }
static int64_t mt_pool_helped(void) { return 0; }
static int64_t mt_pool_waited_ns(void) { return 0; }
#endif

#endif
