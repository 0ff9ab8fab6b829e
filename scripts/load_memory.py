#!/usr/bin/env python
"""Peak memory and time of loading a large checkpoint: safetensors conversion vs an orbax store.

Builds a synthetic Llama-shaped float32 safetensors checkpoint of about ``--size-gb`` in
``--shards`` files (random values; names and shapes from ``kvjax.checkpoint.tensor_specs``)
in a temporary directory, converts it once to an orbax store
(``kvjax.orbax_store.save``), then loads each in a fresh subprocess and reports:

* peak host RSS growth during the load (the peak RSS, ``VmHWM``, minus the RSS just
  before it), against the largest tensor and the whole checkpoint; on the CPU
  backend the loaded params themselves live in host memory, so the transient overhead
  is the peak growth minus the final params' bytes;
* with ``--devices 8`` (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set
  before jax is imported in the subprocess) a mesh of all devices (``model=8``): the
  peak bytes held by each device during the safetensors load (``jax.live_arrays``
  after every placed tensor) against that device's final share + the largest tensor;
* the seconds each load took, the fastest of ``--repeats`` fresh subprocesses (the
  files were just written, so both read from the page cache).

    python scripts/load_memory.py --size-gb 1.5 --shards 4 --dtype bfloat16 [--repeats 3] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9


# ----- the synthetic checkpoint (parent process) -----

def llama_config(size_gb: float) -> dict:
    """A TinyLlama-like ``config.json`` (hidden 2048, GQA 32/4 heads, vocab 32000) with as
    many layers as fit ``size_gb`` of float32 weights (at least one)."""
    hidden, inter, vocab, heads, kv_heads = 2048, 5632, 32000, 32, 4
    head_dim = hidden // heads
    per_layer = (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
                 + 2 * hidden) * 4
    top = (2 * vocab * hidden + hidden) * 4
    layers = max(1, round((size_gb * GB - top) / per_layer))
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "float32"}


def write_checkpoint(directory: str, config_json: dict, shards: int) -> dict:
    """Writes ``config.json``, ``shards`` safetensors files and their index; returns the
    total and largest tensor bytes (float32)."""
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from kvjax.checkpoint import tensor_specs
    from kvjax.config import ModelConfig

    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_json, f, indent=2)
    # one entry per stored tensor (the parts of a fused tensor share one)
    specs = list({s.hf_name: s for s in
                  jax.tree.leaves(tensor_specs(ModelConfig.from_json(directory)))}.values())
    sizes = [4 * int(np.prod(s.hf_shape)) for s in specs]
    total = sum(sizes)
    rng = np.random.default_rng(0)
    weight_map, group, group_bytes, index = {}, {}, 0, 1
    for spec, size in zip(specs, sizes):
        group[spec.hf_name] = (0.02 * rng.standard_normal(spec.hf_shape, np.float32))
        group_bytes += size
        if group_bytes >= total / shards or spec is specs[-1]:
            name = f"model-{index:05d}-of-{shards:05d}.safetensors"
            save_file(group, os.path.join(directory, name), metadata={"format": "pt"})
            weight_map |= {tensor: name for tensor in group}
            group, group_bytes, index = {}, 0, index + 1
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return {"total_bytes": total, "largest_tensor_bytes": max(sizes), "tensors": len(specs),
            "files": index - 1}


# ----- one measured load (subprocess) -----

def device_bytes() -> dict:
    """Bytes each device holds now: every live array's addressable shards, each buffer
    counted once (a shard's ``.data`` is itself a live array on the same buffer)."""
    import jax

    buffers = {(str(shard.device), shard.data.unsafe_buffer_pointer()): shard.data.nbytes
               for array in jax.live_arrays() for shard in array.addressable_shards}
    held: dict = {}
    for (device, _), nbytes in buffers.items():
        held[device] = held.get(device, 0) + nbytes
    return held


def peak_rss() -> int:
    """The process's peak resident set (VmHWM of /proc/self/status), in bytes. Unlike
    ``getrusage``'s max RSS it is not inherited from the parent across fork + exec."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure(kind: str, directory: str, dtype: str, mesh_devices: int) -> dict:
    """Loads ``directory`` (``kind`` "safetensors" or "orbax") and returns its peak RSS
    growth, time and, on a mesh, the peak and final bytes of every device."""
    import jax
    import psutil

    import kvjax
    from kvjax import orbax_store, sharding
    from kvjax.config import ModelConfig

    config = ModelConfig.from_json(directory)
    mesh = sharding.make_mesh() if mesh_devices > 1 else None
    peaks: dict = {}
    if mesh is not None and kind == "safetensors":
        place = jax.make_array_from_callback

        def watched(*args, **kwargs):  # per-device bytes after every placed tensor
            array = place(*args, **kwargs)
            for device, held in device_bytes().items():
                peaks[device] = max(peaks.get(device, 0), held)
            return array

        jax.make_array_from_callback = watched
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the RSS now
        f.write("5")
    before = psutil.Process().memory_info().rss
    cpu_before = psutil.Process().cpu_times()
    start = time.perf_counter()
    if kind == "safetensors":
        params = kvjax.load(directory, dtype=dtype, mesh=mesh).params
    else:
        params = orbax_store.restore_params(directory, config, dtype, mesh=mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    cpu = psutil.Process().cpu_times()
    cpu_seconds = cpu.user + cpu.system - cpu_before.user - cpu_before.system
    final = device_bytes()
    return {"kind": kind, "devices": len(jax.devices()), "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "peak_rss_growth_bytes": peak - before,
            "final_rss_growth_bytes": psutil.Process().memory_info().rss - before,
            "params_bytes": sum(x.nbytes for x in jax.tree.leaves(params)),
            "device_final_bytes": final, "device_peak_bytes": peaks or None}


def run_child(kind: str, directory: str, dtype: str, devices: int, repeats: int) -> dict:
    """``measure`` in ``repeats`` fresh subprocesses: the first run's figures, with the
    fastest time in ``seconds`` (every time in ``seconds_all``) and the least CPU time
    (user + system, all threads) in ``cpu_seconds``."""
    runs = [run_once(kind, directory, dtype, devices) for _ in range(repeats)]
    times = [r["seconds"] for r in runs]
    return {**runs[0], "seconds": min(times), "seconds_all": times,
            "cpu_seconds": min(r["cpu_seconds"] for r in runs)}


def run_once(kind: str, directory: str, dtype: str, devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if devices > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                            + f" --xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, __file__, "--child", kind, directory, dtype],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} load failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----- the report (parent process) -----

def report(ckpt: dict, runs: list[dict], convert_s: float, dtype: str) -> None:
    mib = 2 ** 20
    largest = ckpt["largest_tensor_bytes"]
    print(f"checkpoint: {ckpt['total_bytes'] / mib:.0f} MiB float32 in {ckpt['files']} files, "
          f"{ckpt['tensors']} tensors, largest {largest / mib:.0f} MiB; loaded as {dtype}; "
          f"orbax store written in {convert_s:.1f} s")
    print("held: bytes of the loaded params on all devices; overhead: peak RSS growth - held; "
          "/largest: overhead / largest tensor; /total: peak RSS growth / checkpoint")
    print(f"{'load':<12} {'devices':>7} {'seconds':>8} {'cpu s':>6} {'held MiB':>9} "
          f"{'peak RSS +MiB':>13} {'overhead MiB':>12} {'/largest':>8} {'/total':>7}")
    for r in runs:
        held = sum(r["device_final_bytes"].values())
        overhead = r["peak_rss_growth_bytes"] - held
        print(f"{r['kind']:<12} {r['devices']:>7} {r['seconds']:>8.2f} {r['cpu_seconds']:>6.2f} "
              f"{held / mib:>9.0f} {r['peak_rss_growth_bytes'] / mib:>13.0f} "
              f"{overhead / mib:>12.0f} {overhead / largest:>8.2f} "
              f"{r['peak_rss_growth_bytes'] / ckpt['total_bytes']:>7.2f}")
        if r["device_peak_bytes"]:
            worst = max(r["device_peak_bytes"], key=r["device_peak_bytes"].get)
            peak, final = r["device_peak_bytes"][worst], r["device_final_bytes"][worst]
            print(f"  per device ({worst} the fullest): peak {peak / mib:.0f} MiB, final share "
                  f"{final / mib:.0f} MiB, bound share + largest {(final + largest) / mib:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.5, help="float32 checkpoint size")
    parser.add_argument("--shards", type=int, default=4, help="safetensors files")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--devices", type=int, default=8, help="CPU devices of the mesh run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh subprocesses per load; the fastest time is reported")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "DIR", "DTYPE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        devices = 8 if "host_platform_device_count" in os.environ.get("XLA_FLAGS", "") else 1
        print(json.dumps(measure(*args.child, devices)))
        return 0
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory(prefix="kvjax-load-memory-") as tmp:
        hf_dir, store = os.path.join(tmp, "hf"), os.path.join(tmp, "store")
        os.makedirs(hf_dir)
        ckpt = write_checkpoint(hf_dir, llama_config(args.size_gb), args.shards)
        runs = [run_child("safetensors", hf_dir, args.dtype, 1, args.repeats)]
        start = time.perf_counter()
        import kvjax
        from kvjax import orbax_store

        orbax_store.save(kvjax.load(hf_dir, dtype=args.dtype), store, source_dir=hf_dir)
        convert_s = time.perf_counter() - start
        runs.append(run_child("orbax", store, args.dtype, 1, args.repeats))
        if args.devices > 1:
            runs += [run_child(kind, path, args.dtype, args.devices, args.repeats)
                     for kind, path in (("safetensors", hf_dir), ("orbax", store))]
    report(ckpt, runs, convert_s, args.dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": ckpt, "dtype": args.dtype, "convert_s": convert_s,
                       "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
