//! `kindling pretrain --gpus 0,1` and `--nproc N`: one process per rank, as torchrun launches
//! them. Each child is this same binary with the same arguments (less the launch flag), told
//! its place by torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
//! with `--gpus`, each also gets `--set device=cuda:N`. Rank 0 talks to the terminal as a
//! single-process run does; the other ranks' output is kept, and its last lines are printed if
//! that rank fails. When one rank fails the others are stopped (a collective would otherwise
//! wait for it forever) and the launcher exits with the failing rank's status.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Lines of a rank's output kept for its failure report.
const TAIL: usize = 40;

/// What the launch flags asked for: one rank per listed GPU, or `n` ranks on the recipe's
/// device.
pub enum Ranks {
    Gpus(Vec<usize>),
    Processes(usize),
}

/// GPU indices, as `--gpus 0,1` lists them (one clap value: a plain `Vec` would make clap
/// expect several values).
#[derive(Debug, Clone, PartialEq)]
pub struct GpuList(pub Vec<usize>);

/// `--gpus` value: comma-separated GPU indices, each at most once.
pub fn parse_gpus(s: &str) -> Result<GpuList, String> {
    let mut ids = Vec::new();
    for part in s.split(',') {
        let id = part
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("`{part}` is not a GPU index; expected e.g. --gpus 0,1"))?;
        if ids.contains(&id) {
            return Err(format!("GPU {id} is listed twice (one process per GPU)"));
        }
        ids.push(id);
    }
    Ok(GpuList(ids))
}

/// The arguments the ranks get: ours without `--gpus`/`--nproc` and their values.
fn child_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--gpus" || s == "--nproc" {
            skip_value = true;
        } else if !(s.starts_with("--gpus=") || s.starts_with("--nproc=")) {
            out.push(a);
        }
    }
    out
}

pub fn launch(ranks: Ranks) -> anyhow::Result<u8> {
    let (world, gpus) = match &ranks {
        Ranks::Gpus(ids) => (ids.len(), Some(ids.clone())),
        Ranks::Processes(n) => (*n, None),
    };
    // Settings to fix: said before anything starts, with the exit status of bad input (2).
    let refuse = |msg: &str| {
        eprintln!("error: {msg}");
        Ok(2)
    };
    if world == 0 {
        return refuse("--nproc: expected at least 1 process");
    }
    if gpus.is_some() && !cfg!(feature = "cuda") {
        return refuse(
            "--gpus: this build of kindling has no GPU support; build with `--features nccl` \
             (README, \"GPU builds\")",
        );
    }
    if gpus.is_some() && !cfg!(feature = "nccl") {
        eprintln!(
            "warning: this build has no NCCL (`--features nccl`): gradients will cross GPUs \
             through the host"
        );
    }
    // Rank 0 listens here; the OS picked it free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe = std::env::current_exe()?;
    let args = child_args(std::env::args_os().skip(1));
    // CPU ranks share the cores instead of each starting a thread per core.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_rank = (threads / world).max(1);
    // The terminal's Ctrl-C reaches every rank itself (same process group); the launcher
    // only waits for them, and passes on a SIGTERM sent to it alone.
    let (flag, _) = crate::install_signal_handlers()?;

    let mut children: Vec<Child> = Vec::new();
    let mut tails: Vec<Arc<Mutex<VecDeque<String>>>> = Vec::new();
    for rank in 0..world {
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        if let Some(ids) = &gpus {
            cmd.arg("--set").arg(format!("device=cuda:{}", ids[rank]));
        } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", per_rank.to_string());
        }
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        if rank > 0 {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut children);
                anyhow::bail!("cannot start rank {rank} ({}): {e}", exe.display());
            }
        };
        if let Some(err) = child.stderr.take() {
            let tail = tail.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    let mut t = tail.lock().expect("tail");
                    if t.len() == TAIL {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }
        children.push(child);
        tails.push(tail);
    }

    let mut done: Vec<Option<i32>> = vec![None; world];
    let mut forwarded = false;
    loop {
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank].is_some() {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                let code = status.code().unwrap_or(1);
                done[rank] = Some(code);
                // 128 + a signal: interrupted, checkpointed; the others stop at the same step.
                if code != 0 && code < 128 {
                    stop_all(&mut children);
                    // Give the output thread a moment to read the rank's last words.
                    std::thread::sleep(Duration::from_millis(200));
                    if rank > 0 {
                        eprintln!(
                            "rank {rank} of {world} failed (exit status {code}); its last lines:"
                        );
                        for line in tails[rank].lock().expect("tail").iter() {
                            eprintln!("  [rank {rank}] {line}");
                        }
                    } else {
                        eprintln!("rank 0 of {world} failed (exit status {code}); the others were stopped");
                    }
                    return Ok(code.clamp(1, 255) as u8);
                }
            }
        }
        if done.iter().all(Option::is_some) {
            return Ok(done[0].unwrap_or(1).clamp(0, 255) as u8);
        }
        if flag.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            for child in &children {
                // SAFETY: kill(2) on our own children's pids; no memory is involved.
                unsafe {
                    libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranks_get_the_arguments_without_the_launch_flags() {
        let args = [
            "pretrain",
            "r.toml",
            "--gpus",
            "0,1",
            "--set",
            "a=1",
            "--nproc=2",
            "--overwrite",
        ]
        .map(OsString::from);
        let got = child_args(args.into_iter());
        assert_eq!(
            got,
            ["pretrain", "r.toml", "--set", "a=1", "--overwrite"].map(OsString::from)
        );
    }

    #[test]
    fn gpu_lists_are_indices_each_once() {
        assert_eq!(parse_gpus("0,1, 3"), Ok(GpuList(vec![0, 1, 3])));
        assert!(parse_gpus("0,x")
            .unwrap_err()
            .contains("`x` is not a GPU index"));
        assert!(parse_gpus("1,1").unwrap_err().contains("listed twice"));
    }
}
