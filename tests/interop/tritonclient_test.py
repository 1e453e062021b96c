"""The Open Inference Protocol (KServe v2) driven by the official client.

    python tests/interop/tritonclient_test.py [path/to/convscope]

Run by .ci/run with `tritonclient[http]` from PyPI (pinned there); `cargo
test` does not need it. Starts the release binary on a free loopback port
with the bundled models, then speaks to it only through tritonclient
(and, for the reference logits, through convscope's own `/predict`):

- health, server metadata, model metadata and readiness;
- BYTES images and FP32 tensors, as binary data and as JSON, batch 1 and
  8, on ResNet-20 (CIFAR-10, RGB) and CNN_A (MNIST, greyscale): logits
  equal `/predict`'s within 1e-6 (relative, floor 1), probabilities are
  their softmax;
- the classification extension, versioned paths, gzip/deflate bodies,
  concurrent requests (dynamic batching);
- a wrong shape, a wrong datatype, an unknown input, output and model get
  the protocol's errors, and the server keeps serving.

FP32 inputs are preprocessed here as the manifest says, in float32 with
the server's order of operations ((p / 255 - mean) / std), so they are the
very numbers the server makes from the image.
"""

import base64
import json
import sys
import unittest
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from server import Server

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "target" / "release" / "convscope")
CIFAR = sorted((ROOT / "data" / "cifar10" / "samples").glob("*.png"))[:8]
MNIST = sorted((ROOT / "data" / "mnist" / "samples").glob("*.png"))[:8]
RESNET, CNN_A = "resnet20-cifar10", "cnn-a-mnist"
TOL = 1e-6

url = None


def manifest(model):
    return json.loads((ROOT / "models" / f"{model}.json").read_text())


def preprocess(path, model):
    """The FP32 input the server makes from this image ([C, H, W])."""
    spec = manifest(model)["input"]
    img = Image.open(path)
    img = img.convert("L" if spec["channels"] == 1 else "RGB")
    assert img.size == (spec["width"], spec["height"]), "the samples need no resize"
    px = np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], -1).transpose(2, 0, 1)
    mean = np.array(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.array(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    return (px.astype(np.float32) / np.float32(255.0) - mean) / std


def predict_logits(model, paths):
    """Logits of `/predict` (convscope's own API), one row per image, by class index."""
    boundary = "convscope-oip-test"
    body = b""
    for p in paths:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{p.name}\"\r\n"
                 "Content-Type: image/png\r\n\r\n").encode() + p.read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(
        f"http://{url}/models/{model}/predict?top_k=1000", data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    answer = json.load(urllib.request.urlopen(req))
    rows = []
    for pred in answer["predictions"]:
        row = [0.0] * len(pred["top_k"])
        for c in pred["top_k"]:
            row[c["class_index"]] = c["logit"]
        rows.append(row)
    return np.array(rows, dtype=np.float32)


def softmax(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def assert_close(test, got, want, what, tol=TOL):
    test.assertEqual(got.shape, want.shape, what)
    err = np.abs(got.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))
    test.assertLessEqual(err.max(), tol, f"{what}: max relative error {err.max():.3g}")


def image_input(paths, binary):
    files = [p.read_bytes() for p in paths]
    i = httpclient.InferInput("image", [len(files)], "BYTES")
    if binary:
        i.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)
    else:
        # JSON strings cannot hold an image's bytes: base64, as the README says.
        i.set_data_from_numpy(np.array([base64.b64encode(f) for f in files], dtype=np.object_),
                              binary_data=False)
    return i


def tensor_input(paths, model, binary):
    x = np.stack([preprocess(p, model) for p in paths])
    i = httpclient.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    return i


class OpenInferenceProtocol(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.client = httpclient.InferenceServerClient(url, concurrency=8)

    def test_health_and_metadata(self):
        c = self.client
        self.assertTrue(c.is_server_live())
        self.assertTrue(c.is_server_ready())
        meta = c.get_server_metadata()
        self.assertEqual(meta["name"], "convscope")
        self.assertIn("binary_tensor_data", meta["extensions"])
        self.assertIn("classification", meta["extensions"])
        self.assertTrue(c.is_model_ready(RESNET))
        self.assertTrue(c.is_model_ready(RESNET, model_version="1"))
        self.assertFalse(c.is_model_ready("no-such-model"))
        self.assertFalse(c.is_model_ready(RESNET, model_version="2"))
        for model, shape in [(RESNET, [-1, 3, 32, 32]), (CNN_A, [-1, 1, 28, 28])]:
            m = c.get_model_metadata(model)
            self.assertEqual(m["name"], model)
            self.assertEqual(m["versions"], ["1"])
            self.assertEqual({t["name"]: (t["datatype"], t["shape"]) for t in m["inputs"]},
                             {"input": ("FP32", shape), "image": ("BYTES", [-1])})
            classes = len(manifest(model)["classes"])
            self.assertEqual({t["name"]: (t["datatype"], t["shape"]) for t in m["outputs"]},
                             {"logits": ("FP32", [-1, classes]), "probabilities": ("FP32", [-1, classes])})
        with self.assertRaises(InferenceServerException) as e:
            c.get_model_metadata("no-such-model")
        self.assertEqual(e.exception.status(), "404")
        self.assertIn("no-such-model", e.exception.message())

    def check_outputs(self, result, want, what):
        assert_close(self, result.as_numpy("logits"), want, f"{what}: logits")
        assert_close(self, result.as_numpy("probabilities"), softmax(want), f"{what}: probabilities")

    def test_images_and_tensors_match_predict(self):
        c = self.client
        for model, samples in [(RESNET, CIFAR), (CNN_A, MNIST)]:
            for n in (1, 8):
                paths = samples[:n]
                want = predict_logits(model, paths)
                for binary in (True, False):
                    how = "binary" if binary else "JSON"
                    outputs = None if binary else [httpclient.InferRequestedOutput(name, binary_data=False)
                                                   for name in ("logits", "probabilities")]
                    r = c.infer(model, [image_input(paths, binary)], outputs=outputs, request_id=f"img-{n}")
                    self.assertEqual(r.get_response()["id"], f"img-{n}")
                    self.assertEqual(r.get_response()["model_name"], model)
                    self.check_outputs(r, want, f"{model} BYTES {how} b{n}")
                    r = c.infer(model, [tensor_input(paths, model, binary)], outputs=outputs)
                    self.check_outputs(r, want, f"{model} FP32 {how} b{n}")

    def test_classification_versions_and_compression(self):
        c = self.client
        paths = CIFAR[:4]
        want = predict_logits(RESNET, paths)
        labels = manifest(RESNET)["classes"]
        r = c.infer(RESNET, [image_input(paths, True)],
                    outputs=[httpclient.InferRequestedOutput("logits", class_count=3)])
        top = r.as_numpy("logits")
        self.assertEqual(top.shape, (4, 3))
        for row, entries in zip(want, top):
            order = np.argsort(-row, kind="stable")[:3]
            parsed = [e.decode().split(":") for e in entries]
            self.assertEqual([int(p[1]) for p in parsed], list(order))
            self.assertEqual([p[2] for p in parsed], [labels[i] for i in order])
            assert_close(self, np.array([float(p[0]) for p in parsed], dtype=np.float32), row[order], "top-3 logits")
        r = c.infer(RESNET, [image_input(paths, True)], model_version="1",
                    request_compression_algorithm="gzip", response_compression_algorithm="deflate")
        self.check_outputs(r, want, "versioned, gzip request, deflate answer")
        r = c.infer(RESNET, [tensor_input(paths, RESNET, True)],
                    request_compression_algorithm="deflate", response_compression_algorithm="gzip")
        self.check_outputs(r, want, "deflate request, gzip answer")
        with self.assertRaises(InferenceServerException) as e:
            c.infer(RESNET, [image_input(paths, True)], model_version="2")
        self.assertEqual(e.exception.status(), "404")

    def test_concurrent_requests(self):
        # 16 requests in flight at once through the client's pool: with
        # --predict-batch-delay-ms they share forward passes, and each gets
        # its own rows.
        c = self.client
        want = predict_logits(RESNET, CIFAR)
        pending = [(i, c.async_infer(RESNET, [image_input([CIFAR[i % 8]], True)], request_id=str(i)))
                   for i in range(16)]
        for i, p in pending:
            r = p.get_result()
            self.assertEqual(r.get_response()["id"], str(i))
            self.check_outputs(r, want[i % 8: i % 8 + 1], f"concurrent request {i}")

    def test_errors_are_the_protocols(self):
        c = self.client
        x = np.stack([preprocess(p, RESNET) for p in CIFAR[:2]])

        def refused(status, contains, *args, **kwargs):
            with self.assertRaises(InferenceServerException) as e:
                c.infer(*args, **kwargs)
            self.assertEqual(e.exception.status(), status, e.exception.message())
            self.assertIn(contains, e.exception.message())

        # A wrong shape: MNIST's input to a CIFAR model.
        wrong = httpclient.InferInput("input", [1, 1, 28, 28], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
        refused("400", "[N, 3, 32, 32]", RESNET, [wrong])
        # A wrong datatype.
        fp64 = httpclient.InferInput("input", list(x.shape), "FP64")
        fp64.set_data_from_numpy(x.astype(np.float64))
        refused("400", "it takes FP32", RESNET, [fp64])
        # An input and an output the model does not have.
        other = httpclient.InferInput("pixels", list(x.shape), "FP32")
        other.set_data_from_numpy(x)
        refused("400", "no input `pixels`", RESNET, [other])
        refused("400", "no output `softmax`", RESNET, [image_input(CIFAR[:1], True)],
                outputs=[httpclient.InferRequestedOutput("softmax")])
        # Bytes that are no image.
        junk = httpclient.InferInput("image", [1], "BYTES")
        junk.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
        refused("422", "image", RESNET, [junk])
        # An unknown model.
        refused("404", "no-such-model", "no-such-model", [image_input(CIFAR[:1], True)])
        # And the server still serves.
        self.assertTrue(c.is_server_live())
        r = c.infer(RESNET, [tensor_input(CIFAR[:2], RESNET, True)])
        self.check_outputs(r, predict_logits(RESNET, CIFAR[:2]), "after the errors")


if __name__ == "__main__":
    # Batches wait up to 5 ms for company, so the concurrent test batches.
    with Server(BINARY, "--train-workers", "0", "--predict-batch", "16",
                "--predict-batch-delay-ms", "5") as server:
        url = server.url
        result = unittest.main(argv=[sys.argv[0], "-v"], exit=False).result
        server.failed = not result.wasSuccessful()
    sys.exit(0 if result.wasSuccessful() else 1)
