"""Render the kustomize subset deploy/kubernetes uses, without a kustomize binary.

CI has no kustomize (it is neither on PyPI nor in Debian here), so the tests
render overlays with this: `resources` (files, or directories holding a
kustomization), `components`, `patches` given by `path` (strategic merge
patches naming their target by kind and metadata.name) and `images`
(`newName` / `newTag`). Anything else in a kustomization is refused, so the
manifests cannot quietly grow a feature that this renderer would ignore. Where
`kubectl` is installed, a test checks that it renders the same objects.

Strategic merge, as Kubernetes defines it for the fields these manifests patch:
maps merge recursively; lists of containers, env, volumes, ports and volume
mounts merge by their merge key; every other list is replaced.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "components", "patches", "images"}
# field name -> the key that identifies a list element (Kubernetes' patchMergeKey)
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
    "volumeMounts": "mountPath", "ports": "containerPort",
}

Object = dict[str, Any]


def load_documents(path: Path) -> list[Object]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(directory: Path) -> Object:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            spec: Object = yaml.safe_load((directory / name).read_text())
            unknown = set(spec) - SUPPORTED_FIELDS
            if unknown:
                raise ValueError(f"{directory}: kustomize_lite does not support {sorted(unknown)}")
            return spec
    raise FileNotFoundError(f"no kustomization in {directory}")


def key(obj: Object) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge of `patch` onto `base` (both plain YAML data)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        merge_key = MERGE_KEYS[field]
        out_list = list(base)
        for item in patch:
            index = next((i for i, b in enumerate(out_list) if b.get(merge_key) == item.get(merge_key)), None)
            if index is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[index] = merge(out_list[index], item)
        return out_list
    return copy.deepcopy(patch)


def _containers(obj: Object) -> list[Object]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _set_images(objects: list[Object], images: list[Object]) -> None:
    for image in images:
        for obj in objects:
            for container in _containers(obj):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    new_name = image.get("newName", name)
                    new_tag = str(image.get("newTag", tag))
                    container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name


def _apply(spec: Object, directory: Path, objects: list[Object]) -> list[Object]:
    for component in spec.get("components", []):
        sub = (directory / component).resolve()
        component_spec = _kustomization(sub)
        if component_spec.get("kind") != "Component":
            raise ValueError(f"{sub} is listed as a component but is a {component_spec.get('kind')}")
        objects = _apply(component_spec, sub, objects + _resources(component_spec, sub))
    for patch_ref in spec.get("patches", []):
        if set(patch_ref) != {"path"}:
            raise ValueError(f"{directory}: only `patches: - path: FILE` is supported, got {patch_ref}")
        for patch in load_documents(directory / patch_ref["path"]):
            targets = [i for i, o in enumerate(objects) if key(o) == key(patch)]
            if len(targets) != 1:
                raise ValueError(f"patch {patch_ref['path']} matches {len(targets)} objects for {key(patch)}")
            objects[targets[0]] = merge(objects[targets[0]], patch)
    _set_images(objects, spec.get("images", []))
    return objects


def _resources(spec: Object, directory: Path) -> list[Object]:
    objects: list[Object] = []
    for resource in spec.get("resources", []):
        path = (directory / resource).resolve()
        objects += render(path) if path.is_dir() else load_documents(path)
    return objects


def render(directory: Path) -> list[Object]:
    """The objects `kustomize build directory` would produce (order aside)."""
    spec = _kustomization(directory)
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise ValueError(f"{directory} is a {spec['kind']}; render an overlay that uses it")
    objects = _apply(spec, directory, _resources(spec, directory))
    keys = [key(o) for o in objects]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise ValueError(f"{directory}: objects defined twice: {sorted(duplicates)}")
    return objects
