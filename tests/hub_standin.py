"""A local stand-in for the Hugging Face Hub's file endpoint, for tests that download through
`huggingface_hub` without the network, and a client that loads named weights in a fresh process.

The server answers `HEAD`/`GET /{org}/{repo}/resolve/{revision}/{path}` as the Hub does for a
plain (non-Xet) file: `X-Repo-Commit`, `ETag` and `Content-Length` headers, 404 with
`X-Error-Code: RepoNotFound`, `RevisionNotFound` or `EntryNotFound` otherwise. Every request is
logged in `requests`. Run as a script (`python hub_standin.py OUT.json NAME...`), it calls
`resnet_jax.pretrained.load` on each NAME in that process (so huggingface_hub reads the
HF_ENDPOINT/HF_HOME/HF_HUB_OFFLINE it is given at import) and writes one record per name
(`NAME#K` loads with `num_classes=K`). `python tests/hub_standin.py --serve [PORT]` serves a
random torchvision resnet18 as `timm/resnet18.tv_in1k` until interrupted, for trying the
scripts' `--pretrained resnet18.tv_in1k` by hand with the printed HF_ENDPOINT.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import sys
import threading
from pathlib import Path
from urllib.parse import unquote


class HubStandIn:
    """A threaded HTTP server on 127.0.0.1:`port` (0: a free one) serving `repos` ({repo_id:
    {path: bytes}}); use as a context manager, `url` is the endpoint to put in HF_ENDPOINT."""

    def __init__(self, repos: dict[str, dict[str, bytes]], port: int = 0) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802  (http.server's naming)
                stand_in._answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                stand_in._answer(self, body=True)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def commit(self, repo_id: str) -> str:
        """The repo's 40-hex commit id, a digest of its files."""
        digest = hashlib.sha1()
        for path, data in sorted(self.repos[repo_id].items()):
            digest.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
        return digest.hexdigest()

    def _answer(self, handler: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        """Reply to one request as the Hub's resolve endpoint would."""
        self.requests.append((handler.command, handler.path))
        parts = unquote(handler.path.split("?")[0]).strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(handler, 404, "EntryNotFound", "not a resolve URL", None)
        repo_id, revision, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo_id not in self.repos:
            return self._error(handler, 404, "RepoNotFound", "Repository not found", None)
        commit = self.commit(repo_id)
        if revision not in ("main", commit):
            return self._error(handler, 404, "RevisionNotFound", "Invalid rev id", commit)
        data = self.repos[repo_id].get(path)
        if data is None:
            return self._error(handler, 404, "EntryNotFound", "Entry not found", commit)
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def _error(handler, status: int, code: str, message: str, commit: str | None) -> None:
        """An error reply with the Hub's `X-Error-Code`/`X-Error-Message` headers."""
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        if commit is not None:
            handler.send_header("X-Repo-Commit", commit)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


def _load_all(out: Path, names: list[str], image: Path | None) -> None:
    """Load each name, recording its arch, preprocessing and source, or its error; with `image`
    (a float64 NCHW .npy) also the logits of the first name's model, computed in float64 when
    JAX_ENABLE_X64 is set."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from resnet_jax import pretrained

    records = []
    for spec in names:
        name, _, classes = spec.partition("#")
        dtype = jnp.float64 if image is not None else jnp.float32
        try:
            p = pretrained.load(name, num_classes=int(classes) if classes else None, dtype=dtype)
        except pretrained.PretrainedError as err:
            records.append({"name": spec, "error": str(err)})
            continue
        record = {
            "name": spec,
            "has_fc": "fc" in p.variables["params"],
            "arch": p.arch,
            "preprocessing": [*map(str, vars(p.preprocessing).values())],
            "source": {"repo": p.source.repo, "revision": p.source.revision},
            "license": p.license,
            "leaf_dtypes": sorted({str(a.dtype) for a in jax.tree.leaves(p.variables)}),
            "num_classes": p.model.num_classes,
        }
        if image is not None:
            x = np.load(image).transpose(0, 2, 3, 1)
            logits = p.model.apply(p.variables, jnp.asarray(x), train=False)
            record["logits_dtype"] = str(logits.dtype)
            np.save(out.with_suffix(".npy"), np.asarray(logits))
            image = None
        records.append(record)
    out.write_text(json.dumps({"torch_imported": "torch" in sys.modules, "records": records}))


def resnet18_weights(num_classes: int = 1000, seed: int = 0) -> bytes:
    """A random torchvision resnet18's state_dict as safetensors bytes, its BatchNorm statistics
    taken from two random batches (so they are not the trivial 0 and 1)."""
    import safetensors.torch
    import torch
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=num_classes).train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, 3, 64, 64))
    return safetensors.torch.save({k: v.contiguous() for k, v in net.state_dict().items()})


def hub_env(url: str, hf_home: Path, **extra: str) -> dict[str, str]:
    """Variables pointing a fresh process's huggingface_hub at the stand-in `url` with its cache
    in `hf_home` (any HF_* variable of this process dropped), plus `extra`."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=url, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


def _serve(port: int) -> None:
    """Serve a random torchvision resnet18 as timm/resnet18.tv_in1k on 127.0.0.1:`port` (0:
    any free port) until interrupted."""
    repos = {"timm/resnet18.tv_in1k": {"model.safetensors": resnet18_weights()}}
    stand_in = HubStandIn(repos, port=port)
    print("serving timm/resnet18.tv_in1k (a random resnet18); in another shell:", flush=True)
    print(f"  export HF_ENDPOINT={stand_in.url} HF_HOME=/tmp/hub_standin_home", flush=True)
    with stand_in, contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()


if __name__ == "__main__" and sys.argv[1] == "--serve":
    _serve(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
elif __name__ == "__main__":
    image = (
        Path(sys.argv[2].removeprefix("--image=")) if sys.argv[2].startswith("--image=") else None
    )
    _load_all(Path(sys.argv[1]), sys.argv[3 if image else 2 :], image)
