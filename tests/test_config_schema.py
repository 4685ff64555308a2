"""The declarative config schema (tagd.schema): one generic parser's error paths, and the
example config, the reference docs and the tagging stage's names kept in step with it."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import yaml
from conftest import run_tagd

from tagd import config as cfg
from tagd import schema, vocab
from tagd.tagging import families, labels, preprocess

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "tagd" / "config.example.yaml"
REFERENCE = ROOT / "docs" / "config.md"


def error(tmp_path: Path, data: object) -> str:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse(data, base=tmp_path)
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # wrong type
        ({"offline": "yes"}, "offline: expected true or false, got 'yes'"),
        ({"inference": {"batch_size": "8"}}, "inference.batch_size: expected a whole number >= 1"),
        ({"inference": {"threads": True}}, "inference.threads: expected a whole number >= 1"),
        ({"score_floor": "low"}, "score_floor: expected a number from 0 to 1, got 'low'"),
        ({"database": 3}, "database: expected a path"),
        ({"extensions": ".jpg"}, "extensions: expected a list"),
        ({"inference": []}, "inference: expected a mapping of keys, got list"),
        (["database"], "the top level: expected a mapping of keys, got list"),
        # out of range
        ({"inference": {"batch_size": 0}}, "inference.batch_size: expected a whole number >= 1"),
        ({"score_floor": 1.5}, "score_floor: expected a number from 0 to 1, got 1.5"),
        ({"web": {"port": 70000}}, "web.port: expected a whole number from 0 to 65535"),
        ({"video": {"frames": 65}}, "video.frames: expected a whole number from 1 to 64"),
        ({"video": {"skip": 0.5}}, "video.skip: 0.5 leaves nothing; use a number below 0.5"),
        ({"hydrus": {"interval": 5}}, "hydrus.interval: expected a number >= 10, got 5"),
        # bad choice
        ({"inference": {"device": "tpu"}}, "inference.device: 'tpu' is not one of auto, cpu"),
        ({"families": {"x": {"layout": "CHW"}}}, "families.x.layout: 'CHW' is not one of NHWC"),
        ({"families": {"x": {"label_format": "a.csv"}}}, "families.x.label_format: 'a.csv'"),
        ({"cluster": {"engine": "dask"}}, "cluster.engine: 'dask' is not one of ray"),
        # unknown key, with and without a close match
        ({"infrence": {}}, "infrence: unknown key; did you mean 'inference'?"),
        ({"inference": {"bach_size": 4}}, "inference.bach_size: unknown key; did you mean"),
        ({"web": {"zzz": 1}}, "web.zzz: unknown key; known keys: host, port, base_path"),
        # nested sections and lists: the full key path
        (
            {"models": [{"name": "a", "path": "x"}, {"name": "b", "path": "y", "batch_size": -1}]},
            "models[1].batch_size: expected a whole number >= 1, got -1",
        ),
        ({"watch": ["/a", {"path": "/b", "poll_interval": 0}]}, "watch[1].poll_interval"),
        ({"watch": [{"path": "/b", "include": [3]}]}, "watch[0].include[0]: expected a glob"),
        ({"models": [{"path": "x"}]}, "models[0].name: missing; give the model a short name"),
        ({"families": {"x": {"size": [0, 3]}}}, "families.x.size: expected a whole number >= 1"),
        ({"families": {"x": {"pad_color": [0, 0, 256]}}}, "families.x.pad_color: expected"),
        ({"families": {"x": {"bas": "wd14"}}}, "families.x.bas: unknown key; did you mean 'base'"),
        ({"tags": {"implications": {"a": [""]}}}, "tags.implications.a: expected a tag"),
        ({"hydrus": {"models": ["a", 2]}}, "hydrus.models[1]: expected a model name"),
        ({"cluster": {"actors": "many"}}, "cluster.actors: expected a whole number >= 1"),
    ],
)
def test_generic_parser_errors_name_the_key_path(
    tmp_path: Path, data: object, message: str
) -> None:
    assert message in error(tmp_path, data)


def test_a_token_is_never_echoed_in_an_error(tmp_path: Path) -> None:
    text = error(tmp_path, {"web": {"token": "short"}})
    assert text.startswith("web.token: expected a string of at least 8 characters")
    assert "short" not in text


def test_loaded_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("daemon:\n  max_attempts: 0\n")
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(str(p))
    assert str(err.value).startswith(f"{p}: daemon.max_attempts: expected a whole number >= 1")


def test_values_are_converted_and_defaults_filled(tmp_path: Path) -> None:
    conf = cfg.parse(
        {
            "watch": ["pics", {"path": "/srv/b", "exclude": None}],
            "extensions": ["JPG", ".png"],
            "inference": None,
            "hydrus": {"url": "http://h:1/", "service": " mine "},
            "web": None,
            "cluster": {"actors": "auto", "num_gpus": 1, "path_map": {"/a/": "/b", "/a/c": "/d"}},
            "families": {"x": {"size": 448, "alpha_background": "drop", "scale": 1}},
        },
        base=tmp_path,
    )
    assert conf.watch[0].path == tmp_path / "pics"
    assert conf.watch[1].exclude == cfg.DEFAULT_EXCLUDES
    assert conf.extensions == (".jpg", ".png")
    assert conf.inference == cfg.InferenceConfig()
    assert (conf.hydrus.url, conf.hydrus.service) == ("http://h:1", "mine")
    assert conf.web == cfg.WebConfig()
    assert conf.cluster is not None
    assert (conf.cluster.actors, conf.cluster.num_gpus) == (None, 1.0)
    assert conf.cluster.path_map == (("/a/c", "/d"), ("/a", "/b"))
    assert conf.families == {"x": {"size": [448, 448], "alpha_background": None, "scale": 1.0}}
    assert cfg.parse({}, base=tmp_path).web is None


def test_catalog_shortcut_and_cross_field_rules(tmp_path: Path) -> None:
    conf = cfg.parse({"models": [{"repo": "wd-vit-tagger-v3"}]}, base=tmp_path)
    assert conf.models[0].name == "wd-vit-tagger-v3"
    assert conf.models[0].repo == "SmilingWolf/wd-vit-tagger-v3"
    both = {"models": [{"name": "a", "repo": "o/n", "path": "x"}]}
    assert "models[0]: set exactly one of `repo:`" in error(tmp_path, both)
    fam = {"models": [{"name": "a", "path": "x", "family": "wd15"}]}
    assert "did you mean 'wd14'?" in error(tmp_path, fam)
    custom = {"families": {"mine": {"base": "jtp"}}, "models": [{"name": "a", "path": "x"}]}
    custom["models"][0]["family"] = "mine"
    assert cfg.parse(custom, base=tmp_path).models[0].family == "mine"
    later = {"families": {"a": {"base": "b"}, "b": {}}}
    assert "families.a.base: 'b' is not a built-in family" in error(tmp_path, later)


def test_every_default_passes_its_own_check(tmp_path: Path) -> None:
    """A default the parser would refuse means the schema contradicts itself."""
    ctx = schema.Ctx(tmp_path)
    plain = (schema.Bool, schema.Int, schema.Number, schema.Choice, schema.Text)
    checked = 0
    for _, cls in cfg.SECTIONS:
        for f, spec in schema.specs(cls):
            kind = spec.kind.inner if isinstance(spec.kind, schema.Optional) else spec.kind
            if isinstance(kind, plain) and isinstance(f.default, bool | int | float | str):
                assert kind.parse(f.default, f.name, ctx) == f.default, f.name
                checked += 1
    assert checked > 40


def _section_text(text: str, section: str) -> str:
    """The lines of the example config from `section:` (or `# section:`), with the comment
    paragraph right above it, to the next top-level key or commented top-level key."""
    lines = text.splitlines()
    start = next(
        i for i, line in enumerate(lines) if re.match(rf"^(# )?{re.escape(section)}:", line)
    )
    first = start
    while first > 0 and lines[first - 1].startswith("#"):
        first -= 1
    end = next(
        (
            j
            for j in range(start + 1, len(lines))
            if re.match(r"^(# )?[a-z_]+:", lines[j]) and not lines[j].startswith("#   ")
        ),
        len(lines),
    )
    return "\n".join(lines[first:end])


def test_every_schema_key_is_in_the_example_config_under_its_section() -> None:
    text = EXAMPLE.read_text()
    for path, cls in cfg.SECTIONS:
        if path == schema.TOP:
            block = text
        elif path == "families.NAME":
            block = _section_text(text, "families")
        else:
            block = _section_text(text, path.removesuffix("[]"))
        for name in schema.keys(cls):
            found = re.search(rf"(^|[\s#,(]){re.escape(name)}(:|,|\.|\s|$)", block, re.M)
            assert found, f"config.example.yaml does not document {path}.{name}"


def test_the_example_configs_values_are_the_schema_defaults(tmp_path: Path) -> None:
    """Where the example writes a key out, it writes the default: a changed default in the
    schema fails here until the example says the same."""
    data = yaml.safe_load(EXAMPLE.read_text())
    conf = cfg.parse(data, base=tmp_path)
    plain = cfg.Config(database=conf.database)
    compared = 0
    for section in ("inference", "daemon", "hydrus", "video", "tags"):
        for key in data[section]:
            assert getattr(getattr(conf, section), key) == getattr(getattr(plain, section), key)
            compared += 1
    for key in ("score_floor", "extensions", "max_image_pixels", "offline"):
        assert getattr(conf, key) == getattr(plain, key), key
    assert compared > 25
    assert conf.models[0].thresholds == families.FAMILIES["wd14"].thresholds | {
        "general": 0.35,
        "character": 0.85,
    }


def test_the_reference_doc_is_what_the_schema_renders() -> None:
    text = REFERENCE.read_text()
    assert text == cfg.reference_markdown(), (
        "docs/config.md is stale: regenerate it with `tagd config reference > docs/config.md`"
    )
    for path, cls in cfg.SECTIONS:
        for name in schema.keys(cls):
            assert f"| `{name}` |" in text, f"{path}.{name}"


def test_tagd_config_reference_prints_the_tables() -> None:
    result = run_tagd("config", "reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout == cfg.reference_markdown()
    assert "| `batch_size` |" in result.stdout


def test_the_owning_modules_implement_exactly_the_names_the_config_accepts() -> None:
    assert tuple(families.FAMILIES) == vocab.BUILTIN_FAMILIES
    assert set(labels.READERS) == set(vocab.LABEL_FORMATS)
    assert set(preprocess.RESAMPLE) == set(vocab.RESAMPLES)
    hints = typing.get_type_hints(preprocess.PreprocessSpec)
    assert typing.get_args(hints["layout"]) == vocab.LAYOUTS
    assert typing.get_args(hints["channels"]) == vocab.CHANNELS
    assert typing.get_args(hints["fit"]) == (*vocab.CONFIG_FITS, "stages")
    for name, fam in families.FAMILIES.items():
        for ns, rule in fam.thresholds.items():
            assert not isinstance(rule, str) or rule in vocab.THRESHOLD_MODES, (name, ns)
