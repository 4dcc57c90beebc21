"""flotilla-sdk's Python binding against a real coordinator, as an app uses it.

Run by ../python.sh, which builds the library, generates the `flotilla_sdk` module onto
PYTHONPATH, starts a coordinator and makes the signing keys and trust root. Each test
creates its own product and publishes bundle releases with the real `flotilla` CLI.
Plain unittest: no packages beyond the standard library.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import unittest
import urllib.request

import flotilla_sdk as sdk

WORK = os.environ["FLOTILLA_SDK_TEST_WORK"]
CLI = os.environ["FLOTILLA_SDK_TEST_CLI"]
TRUST_ROOT = os.environ["FLOTILLA_SDK_TEST_TRUST_ROOT"]
URL = os.environ["FLOTILLA_URL"]
SECRET = "sdk-test-enrollment-secret"

# A bundle's large asset: the same in every release, so a later release reuses its chunks.
ASSET = random.Random(7).randbytes(3 << 20)


def flotilla(*args):
    """Runs the CLI with --json; returns its answer, failing the test on a non-zero exit."""
    out = subprocess.run([CLI, "--json", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"flotilla {' '.join(args)} exited {out.returncode}: {out.stdout}{out.stderr}")
    return json.loads(out.stdout) if out.stdout.strip() else None


def publish(product, version, script, notes=None, extra=(), asset=ASSET):
    """Publishes a bundle (index.js says `script`, plus the asset) to 100 %."""
    src = tempfile.mkdtemp(dir=WORK)
    with open(os.path.join(src, "index.js"), "w") as f:
        f.write(script)
    os.mkdir(os.path.join(src, "assets"))
    with open(os.path.join(src, "assets", "data.bin"), "wb") as f:
        f.write(asset)
    args = ["release", "--product", product, "--dir", src, "--version", version, "--rollout", "100"]
    if notes:
        args += ["--notes", notes]
    args += list(extra)
    published = flotilla(*args)
    shutil.rmtree(src)
    return published["id"]


def release_events(release_id):
    """The coordinator's event counts for a release: {kind: devices}."""
    req = urllib.request.Request(
        f"{URL}/v1/releases/{release_id}/stats",
        headers={"Authorization": f"Bearer {os.environ['FLOTILLA_TOKEN']}"},
    )
    with urllib.request.urlopen(req) as resp:
        stats = json.load(resp)
    return {kind: v["devices"] for kind, v in stats["events"].items()}


def device_version(product, device_id):
    """The version the coordinator has on record for a device."""
    answer = flotilla("devices", "list", "--product", product)
    devices = answer["devices"] if isinstance(answer, dict) else answer
    [device] = [d for d in devices if d["device_id"] == device_id]
    return device["version"]


class Recorder(sdk.ProgressListener):
    """Records every progress call."""

    def __init__(self):
        self.calls = []

    def on_progress(self, progress):
        self.calls.append(progress)


class App:
    """One installation of an app: its state and bundle directories, and its config."""

    def __init__(self, test, product, **overrides):
        self.dir = tempfile.mkdtemp(dir=WORK)
        settings = dict(
            coordinator_url=URL,
            product=product,
            enrollment_secret=SECRET,
            device_id=f"{product}-install-1",
            state_dir=os.path.join(self.dir, "state"),
            bundle_dir=os.path.join(self.dir, "bundles"),
            trust_root=sdk.TrustRoot.PATH(path=TRUST_ROOT),
            native_version="1.0.0",
        )
        settings.update(overrides)
        self.config = sdk.UpdaterConfig(**settings)
        test.addCleanup(shutil.rmtree, self.dir, True)

    def start(self):
        """An app start: a new Updater on the same directories."""
        return sdk.Updater(self.config)

    def crash_on_start(self):
        """An app start in another process that dies before marking its bundle healthy."""
        code = (
            "import os, flotilla_sdk as sdk\n"
            f"config = sdk.UpdaterConfig(coordinator_url={URL!r}, product={self.config.product!r}, "
            f"enrollment_secret={SECRET!r}, device_id={self.config.device_id!r}, "
            f"state_dir={self.config.state_dir!r}, bundle_dir={self.config.bundle_dir!r}, "
            f"trust_root=sdk.TrustRoot.PATH(path={TRUST_ROOT!r}), native_version='1.0.0')\n"
            "u = sdk.Updater(config)\n"
            "print(u.start_outcome(), flush=True)\n"
            "os._exit(70)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
        return out.returncode, out.stdout.strip()


def read_script(updater):
    path = updater.current_bundle_path()
    assert path is not None, "no current bundle"
    with open(os.path.join(path, "index.js")) as f:
        return f.read()


def new_product(name):
    flotilla("product", "create", name, "--trust-root", TRUST_ROOT, "--enrollment-secret", SECRET)
    return name


class UpdateFlow(unittest.TestCase):
    def test_check_download_restart_mark_healthy_then_next_release(self):
        product = new_product("sdk-flow")
        app = App(self, product, max_download_rate=6 << 20)
        u = app.start()
        self.assertEqual(u.start_outcome(), sdk.StartOutcome.NORMAL())
        self.assertIsNone(u.current_bundle_path(), "no bundle before the first install")
        self.assertEqual(u.status().state, sdk.UpdateState.IDLE)
        self.assertIsNone(u.check(), "nothing is published yet")

        publish(product, "1.0.0", "console.log('v1')", notes="first bundle")
        info = u.check()
        self.assertIsNotNone(info)
        self.assertEqual((info.version, info.notes, info.staged), ("1.0.0", "first bundle", False))
        self.assertGreater(info.size, len(ASSET))

        progress = Recorder()
        outcome = u.download_and_stage(progress)
        self.assertTrue(outcome.is_STAGED(), outcome)
        self.assertEqual(outcome.version, "1.0.0")
        self.assertEqual(outcome.reused_bytes, 0, "a first install has nothing to reuse")
        last = progress.calls[-1]
        self.assertTrue(last.done)
        self.assertEqual((last.fetched_bytes, last.total_bytes), (outcome.fetched_bytes, info.size))
        during = [p for p in progress.calls if not p.done]
        self.assertGreaterEqual(len(during), 1, f"no progress while downloading (capped at 6 MiB/s): {progress.calls}")
        fetched = [p.fetched_bytes for p in during]
        self.assertEqual(fetched, sorted(fetched), "progress went backwards")
        self.assertTrue(all(p.total_bytes == info.size for p in during))
        self.assertLessEqual(fetched[-1], info.size)

        # Staged: current points at the new bundle for the next start; nothing is on trial yet.
        self.assertEqual(read_script(u), "console.log('v1')")
        with open(os.path.join(u.current_bundle_path(), "assets", "data.bin"), "rb") as f:
            self.assertEqual(f.read(), ASSET)
        self.assertEqual(u.status().state, sdk.UpdateState.STAGED)
        self.assertTrue(u.check().staged)
        self.assertEqual(u.download_and_stage(Recorder()), sdk.StageOutcome.RESTART_PENDING())
        self.assertIsNone(u.mark_healthy(), "the running bundle is not the staged one")
        del u

        u = app.start()
        self.assertEqual(u.start_outcome(), sdk.StartOutcome.ON_TRIAL(version="1.0.0"))
        self.assertEqual(u.status().state, sdk.UpdateState.TRIAL)
        with self.assertRaises(sdk.SdkError.Busy) as busy:
            u.download_and_stage(Recorder())
        self.assertIn("on trial", str(busy.exception))
        self.assertEqual(u.mark_healthy(), "1.0.0")
        self.assertEqual(device_version(product, app.config.device_id), "1.0.0", "the healthy event reached the coordinator")
        status = u.status()
        self.assertEqual((status.state, status.installed_version), (sdk.UpdateState.COMMITTED, "1.0.0"))
        self.assertIsNone(u.mark_healthy(), "committed: nothing on trial any more")
        self.assertIsNone(u.check(), "1.0.0 is the newest")
        v1_path = u.current_bundle_path()

        publish(product, "2.0.0", "console.log('v2')")
        self.assertEqual(u.check().version, "2.0.0")
        progress = Recorder()
        outcome = u.download_and_stage(progress)
        self.assertEqual(outcome.version, "2.0.0")
        self.assertGreater(outcome.reused_bytes, len(ASSET) // 2, "the unchanged asset comes from the current bundle")
        self.assertLess(outcome.fetched_bytes, outcome.reused_bytes)
        last = progress.calls[-1]
        self.assertEqual(
            (last.done, last.fetched_bytes, last.reused_bytes), (True, outcome.fetched_bytes, outcome.reused_bytes)
        )
        during = [p.fetched_bytes for p in progress.calls if not p.done]
        self.assertEqual(during, sorted(during), "progress went backwards")
        self.assertTrue(all(f <= outcome.fetched_bytes for f in during), "counted the previous install's chunks")
        self.assertNotEqual(u.current_bundle_path(), v1_path, "staged into the other slot")
        del u

        u = app.start()
        self.assertEqual(u.start_outcome(), sdk.StartOutcome.ON_TRIAL(version="2.0.0"))
        self.assertEqual(read_script(u), "console.log('v2')")
        self.assertEqual(u.mark_healthy(), "2.0.0")
        self.assertEqual(u.status().installed_version, "2.0.0")

        # A restart after the commit is a normal start on the same bundle.
        del u
        u = app.start()
        self.assertEqual(u.start_outcome(), sdk.StartOutcome.NORMAL())
        self.assertEqual(read_script(u), "console.log('v2')")


class Rollback(unittest.TestCase):
    def test_unmarked_bundle_rolls_back_at_next_start_and_explicit_rollback(self):
        product = new_product("sdk-rollback")
        app = App(self, product)
        publish(product, "1.0.0", "console.log('good')")
        u = app.start()
        self.assertTrue(u.download_and_stage(Recorder()).is_STAGED())
        del u
        u = app.start()
        self.assertEqual(u.mark_healthy(), "1.0.0")
        del u

        # 2.0.0 is staged; the app starts on it and crashes before marking it healthy.
        broken = publish(product, "2.0.0", "throw new Error('broken')")
        u = app.start()
        self.assertEqual(u.download_and_stage(Recorder()).version, "2.0.0")
        del u
        code, printed = app.crash_on_start()
        self.assertEqual(code, 70)
        self.assertIn("ON_TRIAL", printed)
        self.assertIn("2.0.0", printed)

        u = app.start()
        outcome = u.start_outcome()
        self.assertTrue(outcome.is_ROLLED_BACK(), outcome)
        self.assertEqual(outcome.version, "2.0.0")
        self.assertIn("not marked healthy", outcome.reason)
        self.assertEqual(read_script(u), "console.log('good')")
        status = u.status()
        self.assertEqual(status.state, sdk.UpdateState.ROLLED_BACK)
        self.assertEqual((status.installed_version, status.pending_version), ("1.0.0", "2.0.0"))
        self.assertIn("not marked healthy", status.last_error)
        # The rolled-back release is never installed again; the check sends the start's events.
        self.assertIsNone(u.check())
        self.assertEqual(release_events(broken).get("rolled_back"), 1, release_events(broken))
        self.assertEqual(u.download_and_stage(Recorder()), sdk.StageOutcome.UP_TO_DATE())
        self.assertEqual(read_script(u), "console.log('good')")

        # Explicit rollback of a staged bundle.
        publish(product, "3.0.0", "console.log('v3')")
        self.assertEqual(u.check().version, "3.0.0")
        self.assertEqual(u.download_and_stage(Recorder()).version, "3.0.0")
        self.assertEqual(read_script(u), "console.log('v3')")
        self.assertEqual(u.rollback(), "3.0.0")
        self.assertEqual(read_script(u), "console.log('good')")
        self.assertIsNone(u.rollback(), "nothing left to roll back")
        del u
        u = app.start()
        self.assertEqual(u.start_outcome(), sdk.StartOutcome.NORMAL())
        self.assertEqual(read_script(u), "console.log('good')")
        self.assertEqual(u.status().installed_version, "1.0.0")


class BadInput(unittest.TestCase):
    def test_bad_settings_are_refused_with_clear_errors(self):
        with self.assertRaises(sdk.SdkError.Config) as e:
            App(self, "sdk-any", device_id="has spaces").start()
        self.assertIn("device id", str(e.exception))
        with self.assertRaises(sdk.SdkError.Config) as e:
            App(self, "sdk-any", trust_root=sdk.TrustRoot.PATH(path="/nonexistent/root.json")).start()
        self.assertIn("/nonexistent/root.json", str(e.exception))
        with self.assertRaises(sdk.SdkError.Config) as e:
            App(self, "sdk-any", trust_root=sdk.TrustRoot.JSON(json="{not json")).start()
        self.assertIn("trust root", str(e.exception))
        with self.assertRaises(sdk.SdkError.Config) as e:
            App(self, "sdk-any", coordinator_url="ftp://example.invalid").start()
        self.assertIn("coordinator", str(e.exception))
        with self.assertRaises(sdk.SdkError.Config) as e:
            App(self, "sdk-any", trial_starts=0).start()
        self.assertIn("trial_starts", str(e.exception))
        with self.assertRaises(sdk.SdkError.Config) as e:
            sdk.set_log_level("flotilla_agent=loudest")
        self.assertIn("loudest", str(e.exception))

    def test_wrong_enrollment_secret_is_refused_by_the_coordinator(self):
        product = new_product("sdk-secret")
        u = App(self, product, enrollment_secret="wrong").start()
        with self.assertRaises(sdk.SdkError.Network) as e:
            u.check()
        self.assertIn("enrollment_secret", str(e.exception))

    def test_a_bundle_for_a_newer_native_app_asks_for_a_store_update(self):
        product = new_product("sdk-native")
        publish(product, "1.0.0", "console.log('needs native 2')", extra=["--min-native-version", "2.0.0"])
        old_shell = App(self, product, native_version="1.4.0").start()
        with self.assertRaises(sdk.SdkError.NativeUpdateRequired) as e:
            old_shell.check()
        self.assertIn("2.0.0", str(e.exception))
        with self.assertRaises(sdk.SdkError.NativeUpdateRequired):
            old_shell.download_and_stage(Recorder())
        self.assertIsNone(old_shell.current_bundle_path())
        new_shell = App(self, product, native_version="2.1.0", device_id="sdk-native-install-2").start()
        self.assertEqual(new_shell.check().version, "1.0.0")

    def test_a_bundle_tampered_on_the_server_is_refused_and_nothing_changes(self):
        product = new_product("sdk-tampered")
        chunks = os.path.join(WORK, "coordinator", "objects", "chunks")
        before = {os.path.join(d, f) for d, _, files in os.walk(chunks) for f in files}
        publish(product, "1.0.0", "console.log('tampered')", asset=random.Random(11).randbytes(1 << 20))
        fresh = {os.path.join(d, f) for d, _, files in os.walk(chunks) for f in files} - before
        self.assertTrue(fresh, "the release uploaded no chunk of its own")
        for path in fresh:
            with open(path, "r+b") as f:
                data = bytearray(f.read())
                data[-1] ^= 0xFF
                f.seek(0)
                f.write(data)
        u = App(self, product).start()
        self.assertEqual(u.check().version, "1.0.0", "the manifest itself is intact")
        with self.assertRaises(sdk.SdkError.Refused) as e:
            u.download_and_stage(Recorder())
        self.assertIn("failed verification", str(e.exception))
        self.assertIsNone(u.current_bundle_path())
        status = u.status()
        self.assertEqual(status.state, sdk.UpdateState.FAILED)
        self.assertIn("failed verification", status.last_error)

    def test_trust_root_json_is_stored_once(self):
        with open(TRUST_ROOT) as f:
            root = f.read()
        product = new_product("sdk-json-root")
        app = App(self, product, trust_root=sdk.TrustRoot.JSON(json=root))
        publish(product, "1.0.0", "console.log('json root')")
        u = app.start()
        self.assertEqual(u.check().version, "1.0.0")
        with open(os.path.join(app.config.state_dir, "trust-root.json")) as f:
            self.assertEqual(f.read(), root)


if __name__ == "__main__":
    unittest.main()
