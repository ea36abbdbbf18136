#!/usr/bin/python3
"""PyTorch side of the checkpoint interoperability test (tests/test_interop.cpp).

  torch_interop.py write OUT.safetensors OUT_LOGITS.json   trains a small nn.Sequential, saves it
  torch_interop.py read  IN.safetensors  OUT_LOGITS.json   loads a chaingrad checkpoint, predicts

Logits are for the first 8 Fashion-MNIST test images. The safetensors layout is written and read
by hand (json + struct): the format is an 8-byte little-endian header length, a JSON header, and
raw little-endian data.
"""
import gzip
import json
import struct
import sys

import numpy as np
import torch

DATA = "/usr/share/datasets/fashion-mnist"
SPEC = "linear(32) relu linear(10)"


def idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def model():
    return torch.nn.Sequential(torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def save(path, state, metadata):
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name, t in state.items():
        data = t.detach().contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def load(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    state = {}
    for name, info in header.items():
        assert info["dtype"] == "F32", info
        b, e = info["data_offsets"]
        state[name] = torch.from_numpy(np.frombuffer(raw[base + b:base + e], dtype="<f4").reshape(info["shape"]).copy())
    return state, meta


def test_images(mean=0.0, std=1.0):
    x = idx(f"{DATA}/t10k-images-idx3-ubyte.gz")[:8].astype(np.float32) / 255.0
    return torch.from_numpy((x - mean) / std).reshape(8, 784)


def main():
    mode, ckpt, out = sys.argv[1:4]
    torch.manual_seed(0)
    if mode == "write":
        net = model()
        x = torch.from_numpy(idx(f"{DATA}/train-images-idx3-ubyte.gz")[:2048].astype(np.float32) / 255.0).reshape(-1, 784)
        y = torch.from_numpy(idx(f"{DATA}/train-labels-idx1-ubyte.gz")[:2048].astype(np.int64))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for i in range(0, 2048, 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
        save(ckpt, net.state_dict(), {"format": "pt"})
        mean, std = 0.0, 1.0
    else:
        state, meta = load(ckpt)
        net = model()
        net.load_state_dict(state)
        mean, std = (float(v) for v in meta.get("chaingrad.normalization", "0,1").split(","))
    with torch.no_grad():
        logits = net(test_images(mean, std))
    with open(out, "w") as f:
        json.dump({"logits": logits.tolist(), "predicted": logits.argmax(1).tolist()}, f)


if __name__ == "__main__":
    main()
