"""A kustomize build of the subset deploy/ uses, so the tests validate exactly what
`kubectl apply -k` would send: `resources` (files and folders holding a kustomization.yaml),
`images` (newName / newTag) and `patches` given as RFC 6902 operations with a target kind and
name. Any other kustomization field fails the build: a manifest that grew a feature this
builder does not apply must not pass its tests untested."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "images", "patches"}


class KustomizeError(ValueError):
    pass


def build(directory: Path) -> list[dict]:
    """The objects `kustomize build directory` gives."""
    path = directory / "kustomization.yaml"
    if not path.exists():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    k = yaml.safe_load(path.read_text()) or {}
    unknown = set(k) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{path}: fields this builder does not apply: {sorted(unknown)}")
    objects: list[dict] = []
    for entry in k.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            objects.extend(build(target))
        elif target.is_file():
            objects.extend(d for d in yaml.safe_load_all(target.read_text()) if d)
        else:
            raise KustomizeError(f"{path}: resource {entry} does not exist")
    _check_unique(objects, path)
    for patch in k.get("patches", []):
        _patch(objects, patch, directory, path)
    for image in k.get("images", []):
        _set_image(objects, image)
    return objects


def _key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _check_unique(objects: list[dict], path: Path) -> None:
    seen = set()
    for obj in objects:
        if _key(obj) in seen:
            raise KustomizeError(f"{path}: {_key(obj)} defined twice")
        seen.add(_key(obj))


def _patch(objects: list[dict], patch: dict, directory: Path, path: Path) -> None:
    target = patch.get("target") or {}
    ops = yaml.safe_load(patch["patch"]) if "patch" in patch else yaml.safe_load((directory / patch["path"]).read_text())
    if not isinstance(ops, list):
        raise KustomizeError(f"{path}: only RFC 6902 patches (a list of operations) are applied here")
    matched = [o for o in objects if o["kind"] == target.get("kind") and o["metadata"]["name"] == target.get("name")]
    if not matched:
        raise KustomizeError(f"{path}: patch target {target} matches nothing")
    for obj in matched:
        for op in ops:
            _apply(obj, op, path)


def _apply(obj: dict, op: dict, path: Path) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    kind = op["op"]
    if kind in ("add", "replace"):
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(index, copy.deepcopy(op["value"]))
            else:
                parent[index] = copy.deepcopy(op["value"])
        else:
            if kind == "replace" and last not in parent:
                raise KustomizeError(f"{path}: replace of a missing {op['path']}")
            parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    else:
        raise KustomizeError(f"{path}: patch op {kind!r} is not applied here")


def _set_image(objects: list[dict], image: dict) -> None:
    def visit(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "image" and isinstance(value, str) and value.split(":")[0] == image["name"]:
                    node[key] = f"{image.get('newName', image['name'])}:{image.get('newTag', value.partition(':')[2])}"
                else:
                    visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(objects)
