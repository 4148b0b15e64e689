"""The plugin system: built-ins through the hooks, lazy loading, entry-point plugins that are
broken, good or clashing, unknown names, and plugins registered at run time.

Third-party plugins are real installed distributions: a ``NAME-1.0.dist-info`` directory with
``METADATA`` and ``entry_points.txt`` on a path directory, found by ``importlib.metadata`` in a
fresh interpreter whose ``PYTHONPATH`` holds that directory.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from conftest import read_list, run_python

import torchrecord
import torchrecord.plugins as plugins

BUILTIN = "torchrecord (built-in)"

# Environment for the subprocesses: no inherited plugin switches.
CLEAN_ENV = {"TORCHRECORD_STRICT_PLUGINS": "", "TORCHRECORD_DISABLE_PLUGIN_AUTOLOAD": ""}


def installed_entry_point_names() -> set[str]:
    return {ep.name for ep in metadata.entry_points(group=plugins.ENTRY_POINT_GROUP)}


def make_distribution(site: Path, dist: str, module: str, source: str, ep_name: str) -> None:
    """Install a fake distribution ``dist`` 1.0 into ``site`` with one entry point."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[torchrecord]\n{ep_name} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(source))


def site_env(site: Path, **extra: str) -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {**CLEAN_ENV, "PYTHONPATH": pythonpath, **extra}


def plugins_command(site: Path) -> subprocess.CompletedProcess:
    """``torchrecord plugins`` with the distributions of ``site`` installed; it succeeds."""
    proc = subprocess.run(
        [sys.executable, "-m", "torchrecord.cli", "plugins"],
        env={**os.environ, **site_env(site)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def run_json(code: str, env: dict[str, str]) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON document as its last line."""
    proc = run_python(textwrap.dedent(code), env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- 1. built-ins go through the same hooks ---------------------------------------------------


def test_builtins_are_registered_through_the_hooks():
    codecs = {info.name: info for info in plugins.list_codecs()}
    serializers = {info.name: info for info in plugins.list_serializers()}
    assert {"raw_rgb", "jpeg", "smart"} <= set(codecs)
    assert {"tensorprotos", "msgpack"} <= set(serializers)
    expected_modules = {
        "raw_rgb": "torchrecord.codecs.raw_rgb",
        "jpeg": "torchrecord.codecs.jpeg",
        "smart": "torchrecord.codecs.smart",
        "tensorprotos": "torchrecord.serializers.tensorprotos",
        "msgpack": "torchrecord.serializers.msgpack",
    }
    assert set(plugins.DEFAULT_PLUGINS) == set(expected_modules.values())
    for name, module in expected_modules.items():
        info = codecs.get(name) or serializers[name]
        assert info.kind == ("codec" if name in codecs else "serializer")
        assert info.name == name == info.obj.name
        assert info.distribution == BUILTIN
        assert info.version == metadata.version("torchrecord")
        assert info.plugin == module

    pm = plugins.get_plugin_manager()
    for module in plugins.DEFAULT_PLUGINS:
        assert pm.get_plugin(module) is importlib.import_module(module)
    codec_impls = {i.plugin_name for i in pm.hook.torchrecord_register_codecs.get_hookimpls()}
    serializer_impls = {
        i.plugin_name for i in pm.hook.torchrecord_register_serializers.get_hookimpls()
    }
    assert {"torchrecord.codecs.raw_rgb", "torchrecord.codecs.jpeg"} <= codec_impls
    assert {
        "torchrecord.serializers.tensorprotos",
        "torchrecord.serializers.msgpack",
    } <= serializer_impls

    # Calling the hook itself hands back the very objects the lookups return.
    registered = []
    pm.hook.torchrecord_register_codecs(register=registered.append)
    by_name = {codec.name: codec for codec in registered}
    assert by_name["raw_rgb"] is plugins.get_codec("raw_rgb")
    assert by_name["jpeg"] is plugins.get_codec("jpeg")
    assert isinstance(by_name["jpeg"], torchrecord.Codec)


# -- 2. lazy loading --------------------------------------------------------------------------


def test_import_torchrecord_loads_nothing_heavy():
    result = run_json(
        """
        import json, sys
        import torchrecord
        torchrecord.hookimpl, torchrecord.PluginError  # eager names stay cheap
        heavy = ["torch", "torchvision", "PIL", "torchrecord_png"]
        heavy += [m for m in sys.modules if m.startswith(("torchrecord.codecs", "torchrecord.ser"))]
        before = sorted(m for m in heavy if m in sys.modules)
        import torchrecord.plugins
        loaded_after_import = torchrecord.plugins._registry._loaded
        torchrecord.get_codec("jpeg")  # the first lookup loads the plugins
        print(json.dumps({
            "before": before,
            "loaded_after_import": loaded_after_import,
            "loaded_after_lookup": torchrecord.plugins._registry._loaded,
            "jpeg_module_after_lookup": "torchrecord.codecs.jpeg" in sys.modules,
        }))
        """,
        env=CLEAN_ENV,
    )
    assert result["before"] == []
    assert result["loaded_after_import"] is False
    assert result["loaded_after_lookup"] is True
    assert result["jpeg_module_after_lookup"] is True


# -- 3. a broken third-party plugin ------------------------------------------------------------

BROKEN_SOURCE = """
from pathlib import Path
Path(__file__).with_suffix(".imported").write_text("import attempted")
raise ImportError("brokenplug_mod needs a library that is not installed")
"""

PROBE = """
import json, sys, warnings
import torchrecord
import torchrecord.plugins as plugins
out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        out["codecs"] = [info.name for info in plugins.list_codecs()]
        out["resolved"] = [plugins.get_codec(n).name for n in ("raw_rgb", "jpeg")]
    except torchrecord.PluginError as exc:
        out["error"] = [type(exc).__name__, str(exc)]
out["warnings"] = [[w.category.__name__, str(w.message)] for w in caught]
print(json.dumps(out))
"""


@pytest.fixture
def broken_site(tmp_path) -> Path:
    site = tmp_path / "site"
    make_distribution(site, "brokenplug", "brokenplug_mod", BROKEN_SOURCE, "broken")
    return site


def test_broken_plugin_warns_and_is_isolated(broken_site):
    result = run_json(PROBE, site_env(broken_site))
    assert "error" not in result
    assert {"raw_rgb", "jpeg"} <= set(result["codecs"])
    assert result["resolved"] == ["raw_rgb", "jpeg"]
    runtime = [message for category, message in result["warnings"] if category == "RuntimeWarning"]
    assert len(runtime) == 1, result["warnings"]
    assert "brokenplug 1.0" in runtime[0]
    assert "'broken'" in runtime[0]
    assert "needs a library that is not installed" in runtime[0]
    assert "TORCHRECORD_STRICT_PLUGINS" in runtime[0]
    assert (broken_site / "brokenplug_mod.imported").exists()  # it really was tried
    if "png" in installed_entry_point_names():  # other plugins still load
        assert "png" in result["codecs"]

    # the command line lists it as failed, and its warning is one line naming the plugin
    proc = plugins_command(broken_site)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "brokenplug 1.0" in failed[0]
    warned = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(warned) == 1 and warned[0].startswith("torchrecord: warning: TorchRecord plugin")
    assert "plugins.py" not in proc.stderr


def test_broken_plugin_is_an_error_in_strict_mode(broken_site):
    result = run_json(PROBE, site_env(broken_site, TORCHRECORD_STRICT_PLUGINS="1"))
    assert "codecs" not in result
    kind, message = result["error"]
    assert kind == "PluginError"
    assert "brokenplug" in message
    assert "needs a library that is not installed" in message


def test_disabled_autoload_loads_no_entry_point(broken_site):
    result = run_json(PROBE, site_env(broken_site, TORCHRECORD_DISABLE_PLUGIN_AUTOLOAD="1"))
    assert "error" not in result
    assert result["warnings"] == []
    assert result["resolved"] == ["raw_rgb", "jpeg"]
    assert set(result["codecs"]) == {"raw_rgb", "jpeg", "smart"}
    assert not (broken_site / "brokenplug_mod.imported").exists()
    if "png" in installed_entry_point_names():  # the example plugin, when installed
        assert "png" not in result["codecs"]


# -- 4. a good third-party plugin -------------------------------------------------------------

GOOD_SOURCE = """
import io
import torchrecord


class GoodCodec(torchrecord.Codec):
    name = "goodcodec"
    description = "stores the file bytes (a test plugin)"

    def encode(self, path, label):
        from PIL import Image

        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
        return torchrecord.make_record(data, size, label, name=self.name)

    def decode_image(self, record):
        from PIL import Image

        with Image.open(io.BytesIO(record.protos[0].byte_data)) as img:
            return img.convert("RGB")


@torchrecord.hookimpl
def torchrecord_register_codecs(register):
    register(GoodCodec())
"""


def test_good_plugin_is_listed_with_its_distribution(tmp_path, photos):
    site = tmp_path / "site"
    make_distribution(site, "goodplug", "goodplug_mod", GOOD_SOURCE, "good")
    env = site_env(site)
    result = run_json(
        """
        import json
        import torchrecord, torchrecord.plugins as plugins
        info = {i.name: i for i in plugins.list_codecs()}["goodcodec"]
        print(json.dumps({
            "distribution": info.distribution,
            "version": info.version,
            "plugin": info.plugin,
            "is_codec": isinstance(plugins.get_codec("goodcodec"), torchrecord.Codec),
            "builtins": [plugins.get_codec(n).name for n in ("raw_rgb", "jpeg")],
        }))
        """,
        env,
    )
    assert result == {
        "distribution": "goodplug",
        "version": "1.0",
        "plugin": "goodplug:good",
        "is_codec": True,
        "builtins": ["raw_rgb", "jpeg"],
    }

    full_env = {**os.environ, **env}
    cli = [sys.executable, "-m", "torchrecord.cli"]
    proc = subprocess.run(
        [*cli, "plugins"], env=full_env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    good = [row for row in rows if row[:2] == ["codec", "goodcodec"]]
    assert len(good) == 1, proc.stdout
    assert good[0][2:4] == ["goodplug", "1.0"]
    assert "goodplug 1.0" in proc.stdout
    assert "stores the file bytes (a test plugin)" in proc.stdout

    # The codec found through the entry point writes a dataset by name.
    out = tmp_path / "out"
    proc = subprocess.run(
        [*cli, "write", str(photos), str(out), "--codec", "goodcodec", "-q"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["codec"] == "goodcodec"
    assert manifest["num_records"] == len(read_list(photos))
    assert manifest["plugins"]["codec"] == {
        "distribution": "goodplug",
        "version": "1.0",
        "format_version": 1,  # (the Codec base class's: the plugin declares none)
    }
    assert manifest["plugins"]["serializer"]["distribution"] == BUILTIN

    # Without the plugin: reading says which package to install; info and verify warn.
    bare = {**os.environ, **CLEAN_ENV}
    read = run_python(f"import torchrecord; torchrecord.TorchRecord({str(out)!r})", env=CLEAN_ENV)
    assert read.returncode != 0
    assert "was written with codec 'goodcodec' from goodplug 1.0" in read.stderr
    assert "pip install 'goodplug'" in read.stderr
    import pickle

    from torchrecord.reader import RecordReader

    with pytest.raises(torchrecord.UnknownPluginError) as info:
        _ = RecordReader(out).codec  # (the entry point is not on this process's path)
    again = pickle.loads(pickle.dumps(info.value))  # as from a DataLoader worker
    assert str(again) == str(info.value) and "pip install 'goodplug'" in str(again)
    for command in ("info", "verify"):
        proc = subprocess.run(
            [*cli, command, str(out)], env=bare, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert "warning: this dataset cannot be read here" in proc.stderr
        assert "from goodplug 1.0" in proc.stderr
    info = subprocess.run(
        [*cli, "info", str(out)], env=full_env, capture_output=True, text=True, timeout=120
    )
    assert "codec       goodcodec  (from goodplug 1.0)" in info.stdout
    assert "warning" not in info.stderr


# -- 5. duplicate names -----------------------------------------------------------------------


def clashing_source(name: str) -> str:
    """A plugin module that registers a codec named ``name`` (which does nothing)."""
    return f"""
import torchrecord


class Clashing(torchrecord.Codec):
    name = {name!r}

    def encode(self, path, label):
        raise NotImplementedError

    def decode_image(self, record):
        raise NotImplementedError


@torchrecord.hookimpl
def torchrecord_register_codecs(register):
    register(Clashing())
"""


DUP_SOURCE = clashing_source("twin")


def test_duplicate_name_from_an_entry_point_names_both_owners(tmp_path):
    """Two installed packages registering one name: that name cannot be used (its lookup names
    both owners), every other name still works, and `torchrecord plugins` shows the clash.
    (A plugin cannot take a built-in's name at all: test_plugin_contract.)"""
    site = tmp_path / "site"
    make_distribution(site, "dupplug_a", "dupplug_a_mod", DUP_SOURCE, "dup")
    make_distribution(site, "dupplug_b", "dupplug_b_mod", DUP_SOURCE, "dup")
    result = run_json(
        """
        import json, warnings
        import torchrecord, torchrecord.plugins as plugins
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            raw = plugins.get_codec("raw_rgb").name
        try:
            plugins.get_codec("twin")
            error = None
        except torchrecord.DuplicatePluginError as exc:
            error = str(exc)
        print(json.dumps({
            "raw": raw,
            "error": error,
            "warnings": [str(w.message) for w in caught],
            "listed": [info.name for info in plugins.list_codecs()],
        }))
        """,
        site_env(site),
    )
    assert result["raw"] == "raw_rgb"
    assert result["error"] is not None and "'twin'" in result["error"]
    assert "dupplug_a 1.0" in result["error"] and "dupplug_b 1.0" in result["error"]
    assert any("'twin' is registered twice" in w for w in result["warnings"])
    assert "twin" not in result["listed"] and {"raw_rgb", "jpeg"} <= set(result["listed"])

    proc = plugins_command(site)
    assert "unusable: codec name 'twin' is registered twice" in proc.stdout
    assert any(line.split()[:2] == ["codec", "raw_rgb"] for line in proc.stdout.splitlines())

    strict = run_python(
        "import torchrecord.plugins as p; p.get_codec('raw_rgb')",
        env=site_env(site, TORCHRECORD_STRICT_PLUGINS="1"),
    )
    assert strict.returncode != 0 and "DuplicatePluginError" in strict.stderr


HALF_SOURCE = """
import torchrecord


class Half(torchrecord.Codec):
    name = "half"

    def encode(self, path, label):
        raise NotImplementedError("not needed here")

    def decode_image(self, record):
        raise NotImplementedError("not needed here")


@torchrecord.hookimpl
def torchrecord_register_codecs(register):
    register(Half())
    raise RuntimeError("broken after the first registration")


@torchrecord.hookimpl
def torchrecord_register_codec(register):  # misspelled: no such hook
    pass
"""


def test_a_plugin_that_fails_half_way_registers_nothing_and_a_misspelled_hook_warns(tmp_path):
    site = tmp_path / "site"
    make_distribution(site, "halfplug", "halfplug_mod", HALF_SOURCE, "half")
    result = run_json(
        """
        import json, warnings
        import torchrecord.plugins as plugins
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = [info.name for info in plugins.list_codecs()]
        print(json.dumps({"names": names, "warnings": [str(w.message) for w in caught]}))
        """,
        site_env(site),
    )
    assert "half" not in result["names"] and "jpeg" in result["names"]
    assert any(
        "failed while registering codecs, and none of them is registered" in w
        for w in result["warnings"]
    )
    assert any(
        "torchrecord_register_codec," in w and "which is no hook" in w for w in result["warnings"]
    )


class DupSerializer:
    name = "msgpack"

    def dumps(self, record):
        return b"not msgpack"

    def loads(self, data):
        return None


class DupSerializerPlugin:
    @torchrecord.hookimpl
    def torchrecord_register_serializers(self, register):
        register(DupSerializer())


def test_duplicate_name_at_run_time_is_refused_and_the_registry_survives():
    builtin = plugins.get_serializer("msgpack")
    names_before = [info.name for info in plugins.list_serializers()]
    plugin = DupSerializerPlugin()
    pm = plugins.get_plugin_manager()
    try:
        with pytest.raises(torchrecord.DuplicatePluginError) as excinfo:
            plugins.register_plugin(plugin)
        message = str(excinfo.value)
        assert "'msgpack'" in message
        assert BUILTIN in message
        assert "registered at run time" in message
        assert not pm.is_registered(plugin)  # rolled back
        assert plugins.get_serializer("msgpack") is builtin
        assert [info.name for info in plugins.list_serializers()] == names_before
        record = torchrecord.make_record(b"\x01\x02\x03", (3, 1), 5, name="jpeg")
        assert plugins.get_serializer("msgpack").loads(builtin.dumps(record)) == record
    finally:
        if pm.is_registered(plugin):
            plugins.unregister_plugin(plugin)
    assert plugins.get_serializer("msgpack") is builtin


# -- 6. unknown names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lookup, known",
    [
        (plugins.get_codec, ["jpeg", "raw_rgb"]),
        (plugins.get_serializer, ["msgpack", "tensorprotos"]),
    ],
)
def test_unknown_name_lists_the_available_ones(lookup, known):
    with pytest.raises(torchrecord.UnknownPluginError) as excinfo:
        lookup("nope")
    error = excinfo.value
    message = str(error)
    assert "'nope'" in message
    assert "may not be installed" in message
    for name in known:
        assert name in message
        assert name in error.available
    assert isinstance(error, KeyError)
    assert isinstance(error, torchrecord.PluginError)


@pytest.mark.parametrize("option", ["codec", "serializer"])
def test_writer_refuses_an_unknown_name_before_writing(photo_dir, tmp_path, option):
    out = tmp_path / "out"
    with pytest.raises(torchrecord.UnknownPluginError, match="may not be installed") as excinfo:
        torchrecord.Writer(photo_dir / "data_list.txt", out, **{option: "nope"})
    assert excinfo.value.kind == option
    assert not out.exists()


# -- 7. plugins registered at run time --------------------------------------------------------


class GreyCodec(torchrecord.Codec):
    """Stores the image as 8-bit greyscale pixels."""

    name = "test_grey"
    description = "greyscale pixels (a test codec)"

    def __init__(self):
        self.decoded = 0

    def encode(self, path, label):
        from PIL import Image

        with Image.open(path) as img:
            grey = img.convert("L")
        return torchrecord.make_record(grey.tobytes(), grey.size, label, name=self.name)

    def decode_image(self, record):
        from PIL import Image

        self.decoded += 1
        proto = record.protos[0]
        return Image.frombytes("L", tuple(proto.dims), proto.byte_data).convert("RGB")


class GreyPlugin:
    def __init__(self):
        self.codec = GreyCodec()

    @torchrecord.hookimpl
    def torchrecord_register_codecs(self, register):
        register(self.codec)


def test_run_time_codec_writes_and_reads_back(photos, tmp_path):
    import torch
    from PIL import Image

    from torchrecord.transforms import to_seed_tensor

    plugin = GreyPlugin()
    name = plugins.register_plugin(plugin, name="test-grey-plugin")
    try:
        assert plugins.get_codec("test_grey") is plugin.codec
        info = {i.name: i for i in plugins.list_codecs()}["test_grey"]
        assert info.plugin == "test-grey-plugin"
        assert info.distribution == "(registered at run time)"

        out = tmp_path / "out"
        torchrecord.Writer(photos, out, db_num=2, codec="test_grey", shuffle=False).write()
        samples = read_list(photos)

        raw = torchrecord.TRDataset(out, transform=None)
        assert raw.codec == "test_grey"
        assert len(raw) == len(samples)
        for index in (0, len(samples) - 1):
            path, label = samples[index]
            record = raw[index]
            with Image.open(path) as img:
                grey = img.convert("L")
            assert record.protos[0].name == "test_grey"
            assert list(record.protos[0].dims) == list(grey.size)
            assert record.protos[0].byte_data == grey.tobytes()
            assert int(record.protos[1].byte_data) == label
        raw.close()

        dataset = torchrecord.TRDataset(out)
        assert dataset.transform.__self__ is plugin.codec
        before = plugin.codec.decoded
        tensor, label = dataset[3]
        assert plugin.codec.decoded == before + 1
        assert label == samples[3][1]
        assert tensor.shape == (3, 224, 224)
        assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])
        with Image.open(samples[3][0]) as img:
            expected = to_seed_tensor(img.convert("L").convert("RGB"))
        # the default read path is the fast one: within one grey level of 0.1's
        assert (tensor - expected).abs().max().item() <= 1 / 255 + 1e-6
        exact, _ = torchrecord.TRDataset(out, transform="pil")[3]
        assert torch.equal(exact, expected)
        dataset.close()
    finally:
        plugins.unregister_plugin(name=name)
    with pytest.raises(torchrecord.UnknownPluginError):
        plugins.get_codec("test_grey")


class NoEncode:
    name = "no_encode"

    def decode_image(self, record):
        return None


class Reserved(GreyCodec):
    name = "custom"


class Dashed(GreyCodec):
    name = "grey-dash"


class InheritsDecode(torchrecord.Codec):  # a subclass that forgot decode_image
    name = "no_decode"

    def encode(self, path, label):
        return GreyCodec().encode(path, label)


INVALID = [
    (NoEncode, "without encode"),
    (InheritsDecode, "without decode_image"),
    (Reserved, "reserved"),
    (Dashed, "invalid name"),
]


def _plugin_registering(codec_class):
    class Plugin:
        @torchrecord.hookimpl
        def torchrecord_register_codecs(self, register):
            register(codec_class())

    return Plugin()


def _check_invalid_refused(codec_class, words):
    plugin = _plugin_registering(codec_class)
    pm = plugins.get_plugin_manager()
    try:
        with pytest.raises(torchrecord.PluginError, match=words):
            plugins.register_plugin(plugin)
        assert not pm.is_registered(plugin)
        assert codec_class.name not in {info.name for info in plugins.list_codecs()}
        assert plugins.get_codec("jpeg").name == "jpeg"
    finally:
        if pm.is_registered(plugin):
            plugins.unregister_plugin(plugin)


@pytest.mark.parametrize("codec_class, words", INVALID)
def test_invalid_codec_is_refused_in_strict_mode(monkeypatch, codec_class, words):
    monkeypatch.setenv("TORCHRECORD_STRICT_PLUGINS", "1")
    _check_invalid_refused(codec_class, words)


@pytest.mark.parametrize("codec_class, words", INVALID)
def test_invalid_codec_registered_at_run_time_raises(recwarn, codec_class, words):
    _check_invalid_refused(codec_class, words)


def test_run_time_registration_next_to_a_clash_among_installed_plugins(tmp_path):
    """The installed clash (two packages' 'twin') stays a warning; an unrelated plugin
    registered at run time works; one that registers a name twice, or misspells a hook, is told
    so."""
    site = tmp_path / "site"
    make_distribution(site, "dupplug_a", "dupplug_a_mod", DUP_SOURCE, "dup")
    make_distribution(site, "dupplug_b", "dupplug_b_mod", DUP_SOURCE, "dup")
    result = run_json(
        """
        import json, warnings
        import torchrecord, torchrecord.plugins as plugins
        from torchrecord.codecs.raw_rgb import RawRGBCodec

        class Mine(RawRGBCodec):
            name = "mine"

        class Good:
            @torchrecord.hookimpl
            def torchrecord_register_codecs(self, register):
                register(Mine())

        class Twice:
            @torchrecord.hookimpl
            def torchrecord_register_codecs(self, register):
                register(Mine())
                register(Mine())

        class Misspelled:
            @torchrecord.hookimpl
            def torchrecord_register_codec(self, register):
                register(Mine())

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plugins.get_codec("raw_rgb")
            plugins.register_plugin(Good(), name="good")
            mine = plugins.get_codec("mine").name
            plugins.unregister_plugin(name="good")
            try:
                plugins.register_plugin(Twice(), name="twice")
                twice = None
            except torchrecord.DuplicatePluginError as exc:
                twice = str(exc)
            plugins.register_plugin(Misspelled(), name="misspelled")
        print(json.dumps({
            "mine": mine,
            "twice": twice,
            "warnings": [str(w.message) for w in caught],
        }))
        """,
        site_env(site),
    )
    assert result["mine"] == "mine"
    assert "registered twice by one plugin, twice" in (result["twice"] or "")
    clash = [w for w in result["warnings"] if "'twin' is registered twice" in w]
    assert len(clash) == 1  # said once, not again at each registration
    assert any("misspelled" in w and "torchrecord_register_codec," in w for w in result["warnings"])
