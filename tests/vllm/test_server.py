"""Route 2 through vLLM's OpenAI-compatible server: base, a --lora-modules adapter and a .dcm file
served by the plugin's resolver, requested at once.

The server runs as ``python -m vllm.entrypoints.openai.api_server`` (the CPU build's
``vllm serve`` CLI crashes), on 127.0.0.1, in its own process group, stopped by that
group; vLLM finds dcm's plugins through their entry points: the general plugin registers
the resolver (``DCM_LORA_DIR``), and the platform plugin (``DCM_VLLM_PLATFORM=1``) puts
dcm's LoRA backend under vLLM's multi-LoRA, which gives adapter-less tokens no LoRA term:
``max_loras`` is 2 for two adapters, so a base request would get an adapter without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import tiny_llms
from vllm_helpers import NEW_TOKENS, TOP_K, compare, decoded, encoded, hf_model, prompts

from dcm.integrations.vllm import export_lora, export_vllm

FAMILY = "llama"
START_TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def running_server(work, name: str, args: list[str], env: dict):
    """``python -m vllm.entrypoints.openai.api_server ARGS`` on 127.0.0.1, in its own process group;
    yields its URL once /health answers; stops the group."""
    port = _free_port()
    log_path = work / f"{name}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--seed", "0",
         "--max-num-seqs", "16"],
        env=dict(os.environ, **env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: "
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start in {START_TIMEOUT} s") from None
                time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        log.close()


@pytest.fixture(scope="module")
def server(work):
    base = tiny_llms.model_dir(FAMILY)
    ft1 = encoded(work, FAMILY, "ft1", "delta-come")
    adapter1 = work / "server-ft1.lora"
    export_lora(ft1, base, adapter1, overwrite=True)
    folder = work / "served-dcm"
    folder.mkdir(exist_ok=True)
    shutil.copy(encoded(work, FAMILY, "ft2", "delta-come"), folder / "ft2.dcm")
    cache = work / "resolver-cache"
    env = dict(VLLM_ALLOW_RUNTIME_LORA_UPDATING="1", DCM_LORA_DIR=str(folder), DCM_LORA_BASE=str(base),
               DCM_LORA_CACHE=str(cache), DCM_VLLM_PLATFORM="1")
    args = ["--model", str(base), "--enable-lora", "--max-loras", "2", "--max-lora-rank", "32",
            "--lora-modules", f"ft1={adapter1}"]
    with running_server(work, "server-route2", args, env) as url:
        yield url, cache


def _complete(url: str, model: str, prompt: list[int]):
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS,
            "ignore_eos": True, "temperature": 0, "logprobs": TOP_K, "return_tokens_as_token_ids": True}
    choice = _post(f"{url}/v1/completions", body)["choices"][0]
    ids = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    tops = [{int(t.removeprefix("token_id:")): v for t, v in step.items()} for step in choice["logprobs"]["top_logprobs"]]
    return ids, tops


def test_server_mixed_requests_and_resolver(work, server):
    url, cache = server
    base = tiny_llms.model_dir(FAMILY)
    token_prompts = prompts()
    models = [str(base), "ft1", "ft2"]  # base by its served name, an adapter given at start, one resolved
    jobs = [(m, p) for p in token_prompts for m in models]
    with ThreadPoolExecutor(len(jobs)) as pool:  # at once: the engine batches them together
        results = list(pool.map(lambda job: _complete(url, *job), jobs))
    carried = {}
    for role in ("ft1", "ft2"):
        path = encoded(work, FAMILY, role, "delta-come")
        report = export_lora(path, base, work / f"names-{role}.lora", overwrite=True)
        carried[role] = hf_model(base, decoded(path), {m.module + ".weight" for m in report.modules})
    references = {str(base): hf_model(base), **carried}
    for model in models:
        mine = [(p, r) for (m, p), r in zip(jobs, results) if m == model]
        compare(f"server, {'base' if model == str(base) else model}, concurrent requests",
                references[model], [p for p, _ in mine], [r for _, r in mine])
    converted = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(converted) == 1 and converted[0].name.startswith("ft2-")
    # Asked again: served from the cache, not converted again.
    _complete(url, "ft2", token_prompts[0])
    assert [p for p in cache.iterdir() if not p.name.startswith(".")] == converted


def test_server_unknown_name_is_not_found(server):
    url, _ = server
    with pytest.raises(urllib.error.HTTPError) as err:
        _complete(url, "no-such-finetune", prompts()[0])
    assert err.value.code in (400, 404)


def test_platform_plugin_puts_dcm_lora_backend_under_vllm():
    """What the server above runs on: with DCM_VLLM_PLATFORM=1 vLLM picks dcm's platform (a fresh
    process: vLLM chooses its platform once per process), whose punica wrapper is dcm's."""
    code = ("from vllm.platforms import current_platform as p; "
            "print(type(p).__name__, p.get_punica_wrapper())")
    for flag, want in (("1", "DcmCpuPlatform dcm.integrations.vllm.platform.PunicaWrapperDcm"),
                       ("0", "CpuPlatform vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU")):
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DCM_VLLM_PLATFORM=flag),
                             capture_output=True, text=True, timeout=300, check=True)
        assert out.stdout.strip().splitlines()[-1] == want


def test_server_route1_multiprocess(work):
    """Route 1 as `vllm serve DIR` runs it: the exported directory, the engine core in a process
    of its own (vLLM's default: the quantization config travels to it pickled and reopens the
    .dcm there), one fine-tune; requests at once."""
    path = encoded(work, FAMILY, "ft1", "delta-come")
    served = work / "server-route1.vllm"
    if not served.exists():
        export_vllm(path, tiny_llms.model_dir(FAMILY), served)
    token_prompts = prompts()
    with running_server(work, "server-route1", ["--model", str(served)],
                        dict(VLLM_ENABLE_V1_MULTIPROCESSING="1")) as url:
        with ThreadPoolExecutor(len(token_prompts)) as pool:
            results = list(pool.map(lambda p: _complete(url, str(served), p), token_prompts))
    compare("server, route 1 (dcm export vllm), multiprocess engine", hf_model(decoded(path)), token_prompts,
            results)
