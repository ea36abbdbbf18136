#!/usr/bin/python3
"""Interleaved chaingrad vs PyTorch/libtorch benchmark (python3 standard library only).

Runs chaingrad and its peers on the same workload, round-robin
(round 1: every configuration, A B A B ...; round 2: again, ...), and prints a
markdown table with, per configuration: median epoch time (or us/step for the
scalar workload) of each side, the ratio peer/chaingrad (>1: chaingrad is
faster), test accuracy and peak RSS of each side.  Each child's peak RSS is its
own ru_maxrss, taken with os.wait4() on that child.

  bench/compare.py --quick                       # smoke test: 1 round, batch 64
  bench/compare.py --workload mlp,cnn --batch 64,256 --opt sgd,adam --env both
  bench/compare.py --workload scalar --peers torch,libtorch
  bench/compare.py --dry-run ...                 # print the commands only

See bench/README.md.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = "/usr/bin/python3"  # Debian's interpreter with python3-torch
TORCH_CMAKE = "/usr/lib/x86_64-linux-gnu/cmake/Torch/TorchConfig.cmake"
UNSET_PREFIX = ["env", "-u", "OPENBLAS_CORETYPE", "-u", "OPENBLAS_L2_SIZE"]

MODELS = {
    "mlp": "linear(256) relu linear(256) relu linear(10)",
    "cnn": ("conv2d(32,3,pad=1) relu maxpool2d(2) conv2d(64,3,pad=1) relu maxpool2d(2) "
            "flatten linear(128) relu linear(10)"),
}
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}  # as torch_mlp.py / torch_mlp.cpp


def csv(s, conv=str):
    return [conv(x.strip()) for x in s.split(",") if x.strip()]


def parse_args():
    ap = argparse.ArgumentParser(
        description="Interleaved chaingrad vs PyTorch/libtorch benchmark.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--workload", default="mlp", help="comma list of mlp,cnn,scalar")
    ap.add_argument("--batch", default="64", help="comma list of batch sizes")
    ap.add_argument("--threads", default="1", help="comma list of chaingrad thread counts")
    ap.add_argument("--opt", default="sgd", help="comma list of sgd,adam")
    ap.add_argument("--peers", default="torch", help="comma list of torch,libtorch")
    ap.add_argument("--peer-threads", choices=["best", "same", "both"], default="best",
                    help="torch intra-op threads: best = 1 (fastest here, see peers/results.md; "
                         "OpenBLAS keeps its own pool), same = chaingrad's --threads value, "
                         "both = both (deduplicated)")
    ap.add_argument("--peer-blas-threads", choices=["match", "own"], default="match",
                    help="OpenBLAS threads of the peers: match = chaingrad's --threads (exported as "
                         "OPENBLAS_NUM_THREADS, so that 't/1' means t cores on each side), own = "
                         "OpenBLAS's default (all cores). An OPENBLAS_NUM_THREADS already in the "
                         "environment is left as it is either way")
    ap.add_argument("--env", choices=["as-set", "unset", "both"], default="as-set",
                    help="unset = run both sides under `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=1,
                    help="epochs per run; the time of a run is the mean of its epochs, "
                         "the accuracy that after the last epoch")
    ap.add_argument("--lr", type=float, default=None,
                    help="override the learning rate of both sides (default: sgd 0.1, adam 1e-3)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of round 1; round r uses seed + r - 1 on both sides, so the accuracy "
                         "columns are means over as many initializations and data orders as rounds")
    ap.add_argument("--iters", type=int, default=100000, help="scalar workload iterations of the peers")
    ap.add_argument("--cg-iters", type=int, default=None,
                    help="scalar workload iterations of chaingrad (default: 10 x --iters). Its steps "
                         "are ~80x shorter than the peers'; at the same count its sample lasts ~50 ms "
                         "against their 4-6 s, and one burst of another process's load moves it")
    ap.add_argument("--scalar-mode", default="fb",
                    help="peers' scalar_autograd mode; chaingrad gets --mode only if not fb")
    ap.add_argument("--chaingrad", default=os.path.join(REPO, "build", "chaingrad"),
                    help="chaingrad CLI binary")
    ap.add_argument("--chaingrad-args", default="",
                    help="extra arguments appended to every chaingrad command (shell-quoted string)")
    ap.add_argument("--peers-dir", default=os.path.normpath(os.path.join(REPO, "..", "shared", "peers")),
                    help="directory with torch_mlp.py, scalar_autograd.py and the libtorch sources")
    ap.add_argument("--peers-build", default=os.path.join(REPO, "build-peers"),
                    help="cmake build folder for the libtorch peers")
    ap.add_argument("--python", default=PY, help="interpreter for the PyTorch peers")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--json-out", default=None, help="write raw samples here")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="PCT",
                    help="on a shared machine: start each configuration's runs of a round only after "
                         "the CPUs were at least PCT%% idle for one second (0: off)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round, batch 64 only")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.batch = 1, "64"
    a.workloads = csv(a.workload)
    a.batches = csv(a.batch, int)
    a.threads_l = csv(a.threads, int)
    a.opts = csv(a.opt)
    a.peers_l = csv(a.peers)
    a.envs = ["as-set", "unset"] if a.env == "both" else [a.env]
    for w in a.workloads:
        if w not in ("mlp", "cnn", "scalar"):
            ap.error(f"unknown workload {w}")
    for o in a.opts:
        if o not in DEFAULT_LR:
            ap.error(f"unknown optimizer {o}")
    for p in a.peers_l:
        if p not in ("torch", "libtorch"):
            ap.error(f"unknown peer {p}")
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    return a


# ---------------------------------------------------------------- machine info

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def openblas_core(env_variant):
    code = ("import ctypes; o=ctypes.CDLL('libopenblas.so.0'); "
            "o.openblas_get_corename.restype=ctypes.c_char_p; "
            "print(o.openblas_get_corename().decode())")
    cmd = [sys.executable, "-c", code]
    if env_variant == "unset":
        cmd = UNSET_PREFIX + cmd
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return r.stdout.strip() if r.returncode == 0 else f"? ({r.stderr.strip()[-80:]})"
    except Exception as e:  # noqa: BLE001
        return f"? ({e})"


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# OpenBLAS's kernels for CPUs it does not recognize (DYNAMIC_ARCH falls back to them).
GENERIC_OPENBLAS_CORES = {"Prescott", "Core2", "Katmai", "Coppermine", "Northwood", "Banias", "Penryn", "Dunnington"}


def openblas_fallback_note(cores):
    """A note when OpenBLAS runs generic kernels on a CPU with AVX2 or AVX-512: the peers' GEMMs
    (OpenBLAS through PyTorch) are then far from their best (3-4x slower at batch 256 on one such
    machine), and their best is what chaingrad must be compared against."""
    flags = cpu_flags()
    best = "SkylakeX" if "avx512f" in flags else "Haswell" if "avx2" in flags else None
    bad = [ev for ev, core in cores.items() if core in GENERIC_OPENBLAS_CORES]
    if not best or not bad:
        return None
    return (f"OpenBLAS did not recognize this CPU and runs its generic {cores[bad[0]]} kernels "
            f"(env {', '.join(bad)}): the peers are not at their best. Export "
            f"OPENBLAS_CORETYPE={best} (the CPU has {'AVX-512' if best == 'SkylakeX' else 'AVX2'}) "
            f"and run again; chaingrad's float32 products do not use OpenBLAS.")


def env_desc(env_variant):
    if env_variant == "unset":
        return "OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE unset"
    return ", ".join(f"{k}={os.environ.get(k, '(unset)')}"
                     for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                               "OMP_NUM_THREADS"))


# ---------------------------------------------------------------- libtorch

def libtorch_bins(a):
    return {"mlp": os.path.join(a.peers_build, "torch_mlp"),
            "scalar": os.path.join(a.peers_build, "scalar_autograd")}


def libtorch_build_cmds(a):
    return [["cmake", "-S", a.peers_dir, "-B", a.peers_build, "-DCMAKE_BUILD_TYPE=Release"],
            ["cmake", "--build", a.peers_build]]


def ensure_libtorch(a, notes):
    """Returns True if the libtorch peer binaries are usable (building them if needed)."""
    bins = libtorch_bins(a)
    if all(os.access(b, os.X_OK) for b in bins.values()):
        return True
    if not os.path.exists(TORCH_CMAKE) or shutil.which("cmake") is None:
        notes.append(f"libtorch peer skipped: {bins['mlp']} missing and libtorch-dev/cmake "
                     f"not installed ({TORCH_CMAKE})")
        return False
    if a.dry_run:
        for c in libtorch_build_cmds(a):
            print("$ " + shlex.join(c))
        return True
    for c in libtorch_build_cmds(a):
        print("# building libtorch peers: " + shlex.join(c), file=sys.stderr, flush=True)
        r = subprocess.run(c, capture_output=True, text=True)
        if r.returncode != 0:
            notes.append("libtorch peer skipped: build failed: " + shlex.join(c) + "\n"
                         + tail(r.stdout + r.stderr))
            return False
    if all(os.access(b, os.X_OK) for b in bins.values()):
        return True
    notes.append("libtorch peer skipped: build finished but binaries are missing")
    return False


# ---------------------------------------------------------------- configurations

def build_configs(a, notes):
    """A configuration = one row of the table: chaingrad command + one peer command."""
    peers_ok = {"torch": True, "libtorch": False}
    if "libtorch" in a.peers_l:
        peers_ok["libtorch"] = ensure_libtorch(a, notes)
    cg_extra = shlex.split(a.chaingrad_args)
    configs = []
    skipped_cnn_libtorch = False
    for env_v in a.envs:
        for w in a.workloads:
            if w == "scalar":
                cg_iters = a.cg_iters if a.cg_iters is not None else 10 * a.iters
                cg = [a.chaingrad, "bench", "scalar", "--iters", str(cg_iters), "--json"]
                if a.scalar_mode != "fb":
                    cg += ["--mode", a.scalar_mode]
                cg += cg_extra
                for p in a.peers_l:
                    if not peers_ok[p]:
                        continue
                    if p == "torch":
                        pc = [a.python, os.path.join(a.peers_dir, "scalar_autograd.py")]
                    else:
                        pc = [libtorch_bins(a)["scalar"]]
                    pc += ["--iters", str(a.iters), "--threads", "1", "--mode", a.scalar_mode]
                    configs.append(dict(workload=w, env=env_v, opt="-", batch="-",
                                        threads=1, peer=p, peer_threads=1,
                                        cg_cmd=cg, peer_cmd=pc))
                continue
            for opt in a.opts:
                lr = a.lr if a.lr is not None else DEFAULT_LR[opt]
                for b in a.batches:
                    for t in a.threads_l:
                        cg = [a.chaingrad, "train", "--model", MODELS[w], "--optimizer", opt,
                              "--lr", repr(lr), "--batch-size", str(b), "--epochs", str(a.epochs),
                              "--threads", str(t), "--seed", "{SEED}", "--json",
                              # the peers' workload: pixels in [0, 1], a constant learning rate
                              "--normalize", "none", "--schedule", "constant",
                              "--out", "{OUT}"] + cg_extra
                        pts = {"best": [1], "same": [t], "both": sorted({1, t})}[a.peer_threads]
                        for p in a.peers_l:
                            if not peers_ok[p]:
                                continue
                            if p == "libtorch" and w == "cnn":
                                skipped_cnn_libtorch = True
                                continue
                            for pt in pts:
                                if p == "torch":
                                    script = (os.path.join(a.peers_dir, "torch_mlp.py") if w == "mlp"
                                              else os.path.join(REPO, "bench", "torch_cnn.py"))
                                    pc = [a.python, script]
                                else:
                                    pc = [libtorch_bins(a)["mlp"]]
                                pc += ["--batch", str(b), "--epochs", str(a.epochs), "--opt", opt,
                                       "--lr", repr(lr), "--threads", str(pt), "--seed", "{SEED}"]
                                pc = peer_blas_prefix(a.peer_blas_threads, t) + pc
                                configs.append(dict(workload=w, env=env_v, opt=opt, batch=b,
                                                    threads=t, peer=p, peer_threads=pt,
                                                    cg_cmd=cg, peer_cmd=pc))
    if skipped_cnn_libtorch:
        notes.append("libtorch has no CNN peer: cnn rows compare against PyTorch (Python) only")
    return configs


def peer_blas_prefix(mode, threads, environ=None, cpus=None):
    """The prefix that gives a peer's OpenBLAS `threads` threads, or [] where it keeps its default.

    Left alone, OpenBLAS runs on every core: with chaingrad on one thread, the peer would use two
    cores against one. An OPENBLAS_NUM_THREADS the user exported wins, and on `threads` >= the
    number of CPUs the default is that number already."""
    environ = os.environ if environ is None else environ
    if cpus is None:
        cpus = os.cpu_count() or 1
    if mode != "match" or "OPENBLAS_NUM_THREADS" in environ or threads >= cpus:
        return []
    return ["env", f"OPENBLAS_NUM_THREADS={threads}"]


# ---------------------------------------------------------------- running

def tail(s, n=1500):
    s = s.strip()
    return s if len(s) <= n else "..." + s[-n:]


def idle_fraction(seconds=1.0):
    """Share of CPU time spent idle (or waiting for I/O) over `seconds`, from /proc/stat."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)
    i0, t0 = snap()
    time.sleep(seconds)
    i1, t1 = snap()
    return (i1 - i0) / max(t1 - t0, 1)


def wait_idle(pct, max_wait=1800):
    """Blocks until the CPUs were at least pct% idle for one second; returns the seconds waited."""
    start = time.monotonic()
    while idle_fraction() * 100 < pct and time.monotonic() - start < max_wait:
        pass
    return time.monotonic() - start


def full_cmd(cmd, env_v):
    return (UNSET_PREFIX + cmd) if env_v == "unset" else list(cmd)


def run_child(cmd, timeout):
    """Runs cmd; returns (rc, wall_s, maxrss_kb, stdout, stderr). rc None = could not start."""
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        try:
            p = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        except OSError as e:
            return None, 0.0, None, "", f"cannot start: {e}"
        deadline = t0 + timeout
        timed_out = False
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                break
            if time.perf_counter() > deadline and not timed_out:
                timed_out = True
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
        if timed_out:
            err += f"\n[compare.py: killed after {timeout:.0f} s timeout]"
        return p.returncode, wall, ru.ru_maxrss, out, err


def parse_records(stdout):
    """JSON objects on stdout, one per line, optionally prefixed with 'JSON ' (peers)."""
    recs = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("JSON "):
            line = line[5:].strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            recs.append(obj)
    return recs


def first(d, *keys):
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


def summarize_run(workload, recs):
    """-> (metric, accuracy or None, error or None). metric: mean epoch s, or us/step."""
    if workload == "scalar":
        vals = [first(r, "us_per_step", "us_per_iter") for r in recs]
        vals = [float(v) for v in vals if v is not None]
        if not vals:
            return None, None, "no JSON record with us_per_step/us_per_iter on stdout"
        return vals[-1], None, None
    eps = [r for r in recs if "epoch" in r]
    times = [first(r, "epoch_seconds", "epoch_s") for r in eps]
    times = [float(t) for t in times if t is not None]
    if not times:
        return None, None, "no JSON epoch record with epoch_seconds/epoch_s on stdout"
    acc = first(eps[-1], "test_accuracy", "test_acc") if eps else None
    if acc is not None:
        acc = float(acc)
        if acc > 1.0:  # given in percent
            acc /= 100.0
    return statistics.mean(times), acc, None


def one_run(a, cfg, side, failures, seed):
    cmd = cfg["cg_cmd"] if side == "chaingrad" else cfg["peer_cmd"]
    cmd = [str(seed) if x == "{SEED}" else x for x in cmd]
    outdir = None
    if "{OUT}" in cmd:
        outdir = tempfile.mkdtemp(prefix="cg-compare-")
        cmd = [outdir if x == "{OUT}" else x for x in cmd]
    cmd = full_cmd(cmd, cfg["env"])
    rc, wall, rss_kb, out, err = run_child(cmd, a.timeout)
    if outdir:
        shutil.rmtree(outdir, ignore_errors=True)
    recs = parse_records(out)
    metric, acc, perr = summarize_run(cfg["workload"], recs)
    error = None
    if rc is None:
        error = err.strip()
    elif rc != 0:
        error = f"exit status {rc}"
    elif perr:
        error = perr
    s = dict(side=side, cmd=shlex.join(cmd), rc=rc, wall_s=round(wall, 4),
             maxrss_kb=rss_kb, metric=metric, test_accuracy=acc, records=recs, error=error)
    if error:
        s["stderr_tail"] = tail(err)
        s["stdout_tail"] = tail(out, 600)
        failures.append((cfg, s))
        print(f"\n!! {side} FAILED ({error}): {shlex.join(cmd)}\n--- stderr tail ---\n"
              f"{tail(err)}\n--- stdout tail ---\n{tail(out, 600)}\n-------------------",
              file=sys.stderr, flush=True)
    return s


def cfg_label(c):
    if c["workload"] == "scalar":
        return f"scalar env={c['env']} peer={c['peer']}"
    return (f"{c['workload']} {c['opt']} B={c['batch']} t={c['threads']} env={c['env']} "
            f"peer={c['peer']}(t={c['peer_threads']})")


# ---------------------------------------------------------------- report

def med_range(vals, fmt):
    if not vals:
        return "n/a"
    m = statistics.median(vals)
    if len(vals) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} [{fmt.format(min(vals))}–{fmt.format(max(vals))}]"


def paired_ratio(cg, pe):
    """Median [min–max] over the rounds both sides completed of peer / chaingrad within the round.
    The machine drifts by more than the differences measured here, from minute to minute; the two
    runs of one round are minutes apart at most, so their ratio sees less of it than the ratio of
    the medians does."""
    cg_by_round = {s["round"]: s["metric"] for s in cg if s["metric"]}
    ratios = [s["metric"] / cg_by_round[s["round"]] for s in pe if s["round"] in cg_by_round]
    return med_range(ratios, "{:.2f}")


def fmt_acc(vals):
    """Mean over the rounds (each round has its own seed) and, with several rounds, the standard
    error of that mean: accuracy after one epoch moves by points from seed to seed."""
    if not vals:
        return "n/a"
    m = statistics.mean(vals) * 100
    if len(vals) < 2:
        return f"{m:.2f}%"
    return f"{m:.2f} ± {statistics.stdev(vals) * 100 / len(vals) ** 0.5:.2f}%"


def fmt_rss(vals):
    return "n/a" if not vals else f"{statistics.median(vals) / 1024:.0f}"


def report(a, configs, cg_samples, peer_samples, notes, cores, failures):
    print()
    print(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  ")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), kernel {platform.release()}  ")
    for ev in a.envs:
        print(f"OpenBLAS core, env {ev}: **{cores[ev]}** ({env_desc(ev)})  ")
    print(f"Command: `{shlex.join([sys.argv[0]] + sys.argv[1:])}` (cwd `{os.getcwd()}`)  ")
    print(f"Rounds: {a.rounds}, interleaved (chaingrad and peer alternate which runs first), "
          f"epochs per run: {a.epochs}. Time: median [min–max] of the rounds; "
          f"ratio = peer / chaingrad (>1: chaingrad faster); paired = median [min–max] of the same "
          f"ratio taken round by round, which the machine's drift between rounds moves less. "
          f"Round r runs seed {a.seed} + r - 1 on "
          f"both sides; acc = mean ± standard error over the rounds. RSS = child's ru_maxrss, MiB.")
    if any(c["peer_cmd"][:2] == ["env", f"OPENBLAS_NUM_THREADS={c['threads']}"] for c in configs):
        print("Where chaingrad runs on fewer threads than there are CPUs, the peers' OpenBLAS runs on "
              "as many (OPENBLAS_NUM_THREADS, `--peer-blas-threads match`), so both sides use the "
              "same number of cores.  ")
    if a.wait_idle > 0:
        print(f"Each configuration's runs of a round started after the CPUs were ≥ {a.wait_idle:g}% idle for 1 s.")
    print()
    hdr = ("| workload | opt | batch | threads cg/peer | env | peer | chaingrad | peer "
           "| ratio | paired | acc cg | acc peer | RSS cg | RSS peer |")
    print(hdr)
    print("|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, c in enumerate(configs):
        unit = "µs" if c["workload"] == "scalar" else "s"
        fmt = "{:.2f}" if c["workload"] == "scalar" else "{:.3f}"
        cg = [s for s in cg_samples[c["cg_key"]] if not s["error"]]
        pe = [s for s in peer_samples[i] if not s["error"]]
        cgm = [s["metric"] for s in cg]
        pem = [s["metric"] for s in pe]
        ratio = (f"{statistics.median(pem) / statistics.median(cgm):.2f}"
                 if cgm and pem and statistics.median(cgm) > 0 else "n/a")
        paired = paired_ratio(cg, pe)
        ncg_fail = len(cg_samples[c["cg_key"]]) - len(cg)
        npe_fail = len(peer_samples[i]) - len(pe)
        cg_cell = (med_range(cgm, fmt) + (f" {unit}" if cgm else "")
                   + (f" ({ncg_fail} failed)" if ncg_fail else ""))
        pe_cell = (med_range(pem, fmt) + (f" {unit}" if pem else "")
                   + (f" ({npe_fail} failed)" if npe_fail else ""))
        print(f"| {c['workload']} | {c['opt']} | {c['batch']} | {c['threads']}/{c['peer_threads']} "
              f"| {c['env']} | {c['peer']} | {cg_cell} | {pe_cell} | {ratio} | {paired} "
              f"| {fmt_acc([s['test_accuracy'] for s in cg if s['test_accuracy'] is not None])} "
              f"| {fmt_acc([s['test_accuracy'] for s in pe if s['test_accuracy'] is not None])} "
              f"| {fmt_rss([s['maxrss_kb'] for s in cg if s['maxrss_kb']])} "
              f"| {fmt_rss([s['maxrss_kb'] for s in pe if s['maxrss_kb']])} |")
    print()
    print("Commands (round 1):")
    print()
    seen = set()
    for c in configs:
        for cmd in (full_cmd(c["cg_cmd"], c["env"]), full_cmd(c["peer_cmd"], c["env"])):
            line = shlex.join(cmd).replace("'{OUT}'", "<tmpdir>").replace("'{SEED}'", "<seed>")
            if line not in seen:
                seen.add(line)
                print(f"    {line}")
    if notes or failures:
        print()
        for n in notes:
            print(f"* Note: {n}")
        if failures:
            print(f"* {len(failures)} run(s) failed; stderr tails above (stderr) and in --json-out.")
            for c, s in failures[:10]:
                last = " / ".join(s.get("stderr_tail", "").strip().splitlines()[-2:])
                print(f"  * {s['side']} round {s.get('round', '?')} [{cfg_label(c)}]: {s['error']}"
                      + (f" — stderr: `{last[-200:]}`" if last else ""))


def main():
    a = parse_args()
    notes = []
    configs = build_configs(a, notes)
    # chaingrad runs are shared between rows that differ only in the peer
    cg_keys = {}
    for c in configs:
        k = (c["env"], tuple(c["cg_cmd"]))
        c["cg_key"] = cg_keys.setdefault(k, len(cg_keys))
    if not configs:
        for n in notes:
            print(f"* Note: {n}")
        print("nothing to run", file=sys.stderr)
        return 2

    if a.dry_run:
        for n in notes:
            print(f"# note: {n}")
        print(f"# {a.rounds} round(s) of (chaingrad first on odd rounds, peer first on even):")
        done = set()
        for c in configs:
            for cmd in (c["cg_cmd"], c["peer_cmd"]):
                line = shlex.join(full_cmd(cmd, c["env"])).replace("'{OUT}'", "<tmpdir>").replace("'{SEED}'", "<seed>")
                if line not in done:
                    done.add(line)
                    print(line)
        return 0

    if not os.access(a.chaingrad, os.X_OK):
        notes.append(f"chaingrad binary {a.chaingrad} not found/executable: chaingrad side fails")
    cores = {ev: openblas_core(ev) for ev in a.envs}
    fallback = openblas_fallback_note(cores)
    if fallback:
        notes.append(fallback)
        print(f"# warning: {fallback}", file=sys.stderr, flush=True)

    cg_samples = {k: [] for k in cg_keys.values()}
    peer_samples = {i: [] for i in range(len(configs))}
    peer_by_cmd = {}  # (env, cmd) -> list of config indices sharing this peer command
    for i, c in enumerate(configs):
        peer_by_cmd.setdefault((c["env"], tuple(c["peer_cmd"])), []).append(i)
    failures = []
    raw = []
    total = a.rounds * (len(cg_keys) + len(peer_by_cmd))
    n = 0
    for r in range(1, a.rounds + 1):
        done_cg, done_peer = set(), set()
        for i, c in enumerate(configs):
            pk = (c["env"], tuple(c["peer_cmd"]))
            order = ["chaingrad", "peer"] if r % 2 == 1 else ["peer", "chaingrad"]
            if a.wait_idle > 0:
                waited = wait_idle(a.wait_idle)
                if waited > 1.5:
                    print(f"    (waited {waited:.0f} s for {a.wait_idle:g}% idle CPUs)", file=sys.stderr, flush=True)
            for side in order:
                if side == "chaingrad" and c["cg_key"] in done_cg:
                    continue
                if side == "peer" and pk in done_peer:
                    continue
                n += 1
                print(f"[{n}/{total}] round {r}: {side} {cfg_label(c)}", file=sys.stderr, flush=True)
                s = one_run(a, c, side, failures, a.seed + r - 1)
                s["round"] = r
                s["config"] = {k: v for k, v in c.items() if k not in ("cg_cmd", "peer_cmd")}
                raw.append(s)
                if side == "chaingrad":
                    done_cg.add(c["cg_key"])
                    cg_samples[c["cg_key"]].append(s)
                else:
                    done_peer.add(pk)
                    for j in peer_by_cmd[pk]:
                        peer_samples[j].append(s)
                if not s["error"]:
                    m = s["metric"]
                    unit = "us/step" if c["workload"] == "scalar" else "s/epoch"
                    print(f"    {m:.4g} {unit}, rss {(s['maxrss_kb'] or 0) / 1024:.0f} MiB",
                          file=sys.stderr, flush=True)

    report(a, configs, cg_samples, peer_samples, notes, cores, failures)
    if a.json_out:
        doc = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   argv=sys.argv, cwd=os.getcwd(), cpu=cpu_model(), cpus=os.cpu_count(),
                   openblas_core=cores, env={ev: env_desc(ev) for ev in a.envs},
                   rounds=a.rounds, epochs=a.epochs, notes=notes,
                   configs=[{k: v for k, v in c.items()} for c in configs],
                   samples=raw)
        with open(a.json_out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"\nraw samples: {a.json_out}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
