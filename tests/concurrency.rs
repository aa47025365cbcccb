//! Several VMs' hooks at once, as qemu-server runs them (hooks of different VMs in parallel):
//! four VMs with disjoint CPUs on the Ryzen 5900X fixture host, each holding shared claims
//! (composed IRQ affinities and the default affinity, the same sysctl, governors), started and
//! stopped by threads of their own in a random order with random pauses, for several rounds.
//! The node lock serialises the hooks; after every round the host tree is the one from before,
//! byte for byte, and the ledger holds nothing.

mod fixture;

use fixture::{FakeVm, fake_qmp, host_copy, pvetune, snapshot, stderr, stdout, write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The VMs: disjoint CPUs, each with its own `vm.stat_interval` (one claim, four holders).
const VMS: [(u32, &str, u32); 4] = [
    (100, "6-8,18-20", 120),
    (101, "9-11,21-23", 60),
    (102, "3-5,15-17", 30),
    (103, "1-2,13-14", 240),
];
const ROUNDS: u64 = 10;

/// A small deterministic PRNG (xorshift64*), seeded per round so that a failure names the
/// seed that reproduces its order.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn add_vm(root: &Path, vmid: u32, cpus: &str, interval: u32) {
    write(
        root,
        &format!("/etc/pve/pvetune/{vmid}.yaml"),
        &format!(
            "cpus: {cpus}\nvcpus: sequential\nemulator: housekeeping\ngovernor: performance\n\
             sysctl:\n  vm.stat_interval: {interval}\nisolation:\n  irqs: true\n"
        ),
    );
    write(
        root,
        &format!("/etc/pve/qemu-server/{vmid}.conf"),
        "cores: 2\nmemory: 512\n",
    );
}

/// One VM's life in a thread: pre-start, QEMU, post-start, pre-stop, QEMU gone, post-stop,
/// with a random pause (0-15 ms) before each step; a failed hook is logged in `log`.
fn life(root: &Path, vmid: u32, seed: u64, log: &Mutex<Vec<String>>) {
    let mut rng = Rng::new(seed ^ (u64::from(vmid) << 32));
    let id = vmid.to_string();
    let pause = |rng: &mut Rng| std::thread::sleep(Duration::from_millis(rng.below(16)));
    let hook = |phase: &str| {
        let out = pvetune(root, &[&id, phase]);
        if !out.status.success() {
            log.lock().unwrap().push(format!(
                "seed {seed}: VM {vmid} {phase} failed ({}): {}",
                out.status,
                stderr(&out)
            ));
        }
    };
    pause(&mut rng);
    hook("pre-start");
    pause(&mut rng);
    let mut vm = FakeVm::start(root, vmid);
    fake_qmp(root, vmid);
    hook("post-start");
    pause(&mut rng);
    hook("pre-stop");
    vm.kill();
    pause(&mut rng);
    hook("post-stop");
}

#[test]
fn vms_started_and_stopped_concurrently_in_random_orders_leave_the_host_as_it_was() {
    let root = host_copy("ryzen-5900x");
    for (vmid, cpus, interval) in VMS {
        add_vm(&root.path, vmid, cpus, interval);
    }
    let before = snapshot(&root.path);
    let t0 = Instant::now();
    for round in 0..ROUNDS {
        let seed = 0x5EED_0000 + round;
        let mut rng = Rng::new(seed);
        // The threads start in a shuffled order (Fisher-Yates), each after its own pauses.
        let mut order: Vec<usize> = (0..VMS.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let failures = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for &i in &order {
                let (root, failures) = (&root.path, &failures);
                s.spawn(move || life(root, VMS[i].0, seed, failures));
            }
        });
        let failures = failures.into_inner().unwrap();
        assert!(
            failures.is_empty(),
            "round {round} (seed {seed}, start order {order:?}):\n{}",
            failures.join("\n")
        );
        let now = snapshot(&root.path);
        if now != before {
            let differ: Vec<&String> = before
                .keys()
                .chain(now.keys())
                .filter(|k| before.get(*k) != now.get(*k))
                .collect();
            panic!("round {round} (seed {seed}, start order {order:?}): files differ: {differ:?}");
        }
        let status = stdout(&pvetune(&root.path, &["status"]));
        assert!(
            status.contains("holds nothing"),
            "round {round} (seed {seed}, start order {order:?}): {status}"
        );
    }
    println!(
        "{ROUNDS} rounds of {} VMs in {:.1} s",
        VMS.len(),
        t0.elapsed().as_secs_f64()
    );
}
