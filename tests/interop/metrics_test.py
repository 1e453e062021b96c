"""`/metrics` read by the Prometheus project's own Python parsers.

    python tests/interop/metrics_test.py [path/to/convscope]

Run by .ci/run with `prometheus_client` from PyPI (pinned there). Both
formats the server negotiates must parse: the classic text format 0.0.4
(`prometheus_client.parser`) by default, and OpenMetrics 1.0
(`prometheus_client.openmetrics.parser`, which also checks the `# EOF`,
the counter naming and the histogram rules) with
`Accept: application/openmetrics-text`. A dashboard built on the names and
labels of earlier releases keeps working: those families are all here, with
their types, beside the process and build metrics.
"""

import sys
import unittest
import urllib.request
from pathlib import Path

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_classic

from server import Server

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "target" / "release" / "convscope")
CAT = ROOT / "data" / "cifar10" / "samples" / "test0000_cat.png"

# (family name as the classic parser reports it, type): what the
# hand-written exporter of earlier releases served.
EARLIER = {
    ("convscope_http_requests", "counter"),
    ("convscope_http_request_duration_seconds", "histogram"),
    ("convscope_model_compute_seconds", "histogram"),
    ("convscope_compute_queue_depth", "gauge"),
    ("convscope_compute_running", "gauge"),
    ("convscope_jobs", "gauge"),
    ("convscope_job_queue_depth", "gauge"),
    ("convscope_models_loaded", "gauge"),
    ("convscope_inputs_cache_bytes", "gauge"),
    ("convscope_inputs_cache_hits", "counter"),
    ("convscope_inputs_cache_misses", "counter"),
}
NEW = {
    ("process_cpu_seconds", "counter"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_virtual_memory_bytes", "gauge"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_threads", "gauge"),
    ("process_start_time_seconds", "gauge"),
}
url = None


def scrape(accept=None):
    req = urllib.request.Request(f"http://{url}/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req) as r:
        return r.headers["Content-Type"], r.read().decode()


class Metrics(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        for _ in range(3):
            req = urllib.request.Request(f"http://{url}/models/resnet20-cifar10/predict", data=CAT.read_bytes(),
                                         headers={"Content-Type": "image/png"})
            urllib.request.urlopen(req).read()

    def test_classic_text_parses_with_every_earlier_family(self):
        ct, text = scrape()
        self.assertTrue(ct.startswith("text/plain; version=0.0.4"), ct)
        families = {(f.name, f.type): f for f in parse_classic(text)}
        for want in EARLIER | NEW:
            self.assertIn(want, families, f"{want} missing")
        build = [f for (name, _), f in families.items() if name == "convscope_build_info"]
        self.assertTrue(build and build[0].samples[0].labels["version"], families.keys())
        requests = families[("convscope_http_requests", "counter")]
        ok = [s for s in requests.samples
              if s.labels == {"route": "/models/{model}/predict", "method": "POST", "status": "200"}]
        self.assertEqual([s.value for s in ok], [3.0])
        latency = families[("convscope_http_request_duration_seconds", "histogram")]
        inf = [s for s in latency.samples if s.name.endswith("_bucket") and s.labels.get("le") == "+Inf"
               and s.labels["route"] == "/models/{model}/predict"]
        self.assertEqual([s.value for s in inf], [3.0])
        # Bucket bounds written as earlier releases wrote them (le="1", not "1.0").
        bounds = {s.labels["le"] for s in latency.samples if s.name.endswith("_bucket")}
        self.assertEqual(bounds, {"0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
                                  "0.25", "0.5", "1", "2.5", "5", "10", "30", "+Inf"})
        rss = families[("process_resident_memory_bytes", "gauge")].samples[0].value
        self.assertGreater(rss, 10e6)

    def test_openmetrics_parses_when_asked_for(self):
        ct, text = scrape("application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5")
        self.assertTrue(ct.startswith("application/openmetrics-text; version=1.0.0"), ct)
        self.assertTrue(text.endswith("# EOF\n"))
        families = {(f.name, f.type) for f in parse_openmetrics(text)}
        for want in EARLIER | NEW | {("convscope_build", "info")}:
            self.assertIn(want, families, f"{want} missing")


if __name__ == "__main__":
    with Server(BINARY, "--train-workers", "0") as server:
        url = server.url
        result = unittest.main(argv=[sys.argv[0], "-v"], exit=False).result
        server.failed = not result.wasSuccessful()
    sys.exit(0 if result.wasSuccessful() else 1)
