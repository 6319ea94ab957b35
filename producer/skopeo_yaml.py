"""``skopeo sync`` YAML as input, translated to the entries list lines would give:

    registry.example.com:
      images:
        busybox: []                  # every tag           ->  --all-tags registry.example.com/busybox
        redis: ["7.2.4", "sha256:…"] # these tags, digests ->  registry.example.com/redis:7.2.4, …@sha256:…
      images-by-tag-regex:
        nginx: ^1\\.2[0-9]\\.[0-9]+$  #                     ->  --tags=^1\\.2[0-9]\\.[0-9]+$ registry.example.com/nginx
      images-by-semver:
        alpine: ">= 3.12.0, < 4"     # commas are "and"    ->  --semver=">= 3.12.0 < 4" registry.example.com/alpine
      tls-verify: false              # a warning: TLS is a worker setting (FERRY_INSECURE_REGISTRIES)

skopeo matches a tag regex anywhere in the tag; ferry's ``--tags`` matches whole tags, so an
unanchored pattern is widened with ``.*`` on the open side. Credentials are refused: they belong
on the workers, never in a file the producer reads and a batch records.
"""

from __future__ import annotations

import yaml

from config.reference import InvalidReference, Reference
from config.selectors import SelectorError, TagSelector
from producer.listfile import LineError, ListEntry, ListFileError, ParsedList

_SECRET_KEYS = frozenset({"credentials", "username", "password", "identitytoken", "auth"})
_IGNORED = {"cert-dir": "ferry reads CA certificates from the system store on the workers"}
_CREDENTIALS = ("credentials are not accepted in the YAML: ferry reads them on the workers, from "
                "~/.docker/config.json or FERRY_REGISTRIES ({registry: {username, password}}); remove them here")


def parse_skopeo_yaml(data: bytes) -> ParsedList:
    """Entries for every image and selector in a ``skopeo sync`` YAML; ListFileError naming every
    problem (with YAML line numbers) otherwise."""
    try:
        root = yaml.compose(data.decode("utf-8"), Loader=yaml.SafeLoader)
    except UnicodeDecodeError as exc:
        raise ListFileError([LineError(0, "", f"not valid UTF-8 (byte {exc.start + 1})")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ListFileError([LineError(mark.line + 1 if mark else 0, "", f"not valid YAML: "
                                       f"{getattr(exc, 'problem', None) or exc}")]) from None
    parsed, errors = ParsedList(), []
    if not isinstance(root, yaml.MappingNode):
        errors.append(LineError(_line(root), "", "expected a mapping of registries at the top level"))
    else:
        for key, value in root.value:
            _registry(key, value, parsed, errors)
    seen: dict[tuple[str, TagSelector | None], int] = {}
    unique = []
    for entry in parsed.entries:
        first = seen.setdefault((str(entry.source), entry.selector), entry.line)
        if first != entry.line:
            parsed.warnings.append(f"line {entry.line} repeats line {first} ({entry.text}); ignored")
        else:
            unique.append(entry)
    parsed.entries = unique
    if not parsed.entries and not errors:
        errors.append(LineError(0, "", "no images in the YAML"))
    if errors:
        raise ListFileError(errors)
    return parsed


def _line(node: yaml.Node | None) -> int:
    return node.start_mark.line + 1 if node is not None else 0


def _registry(key: yaml.Node, value: yaml.Node, parsed: ParsedList, errors: list[LineError]) -> None:
    registry = key.value if isinstance(key, yaml.ScalarNode) else ""
    if not isinstance(value, yaml.MappingNode):
        errors.append(LineError(_line(key), registry, "expected a mapping under the registry"))
        return
    for k, v in value.value:
        name = k.value if isinstance(k, yaml.ScalarNode) else ""
        if name.lower() in _SECRET_KEYS:
            errors.append(LineError(_line(k), f"{registry}: {name}", _CREDENTIALS))
        elif name == "tls-verify":
            if isinstance(v, yaml.ScalarNode) and v.value.lower() in ("false", "no", "off"):
                parsed.warnings.append(f"line {_line(k)}: tls-verify: false for {registry} is a worker setting in "
                                       f"ferry: add {registry} to FERRY_INSECURE_REGISTRIES on the workers")
        elif name in _IGNORED:
            parsed.warnings.append(f"line {_line(k)}: {name} ignored: {_IGNORED[name]}")
        elif name in ("images", "images-by-tag-regex", "images-by-semver"):
            _images(registry, name, v, parsed, errors)
        else:
            errors.append(LineError(_line(k), f"{registry}: {name}", f"unknown skopeo sync key {name!r}"))


def _images(registry: str, kind: str, node: yaml.Node, parsed: ParsedList, errors: list[LineError]) -> None:
    if not isinstance(node, yaml.MappingNode):
        errors.append(LineError(_line(node), kind, f"expected a mapping of repositories under {kind}"))
        return
    for k, v in node.value:
        repo = k.value if isinstance(k, yaml.ScalarNode) else ""
        line = _line(k)
        try:
            source = Reference.parse(f"{registry}/{repo}")
            if repo.rfind(":") > repo.rfind("/") or "@" in repo:
                raise InvalidReference(repo, "give the repository without a tag or digest")
            if kind == "images":
                parsed.entries += _listed(source, v, line)
            else:
                value = v.value if isinstance(v, yaml.ScalarNode) else None
                if not value:
                    raise SelectorError(f"expected one {'regex' if kind == 'images-by-tag-regex' else 'range'} "
                                        f"for {repo}")
                selector = (TagSelector.of(tags=[_whole_match(value)]) if kind == "images-by-tag-regex"
                            else TagSelector.of(semver=" ".join(value.replace(",", " ").split())))
                text = f"{selector.describe()} {source.name}"
                parsed.entries.append(ListEntry(line, text, source, selector=selector))
        except InvalidReference as exc:
            errors.append(LineError(line, f"{registry}/{repo}", f"bad reference: {exc.reason}"))
        except SelectorError as exc:
            errors.append(LineError(line, f"{registry}/{repo}", exc.reason))


def _listed(source: Reference, node: yaml.Node, line: int) -> list[ListEntry]:
    """``repo: []`` is every tag; ``repo: [tag, sha256:…]`` those images."""
    items = node.value if isinstance(node, yaml.SequenceNode) else None
    if items is None or not all(isinstance(i, yaml.ScalarNode) for i in items):
        raise SelectorError(f"expected a list of tags for {source.name} ([] for every tag)")
    if not items:
        selector = TagSelector.of(all_tags=True)
        return [ListEntry(line, f"--all-tags {source.name}", source, selector=selector)]
    entries = []
    for item in items:
        ref = source.with_digest(item.value).with_tag(None) if item.value.startswith("sha256:") else (
            source.with_tag(item.value))
        entries.append(ListEntry(_line(item), str(ref), ref))
    return entries


def _whole_match(pattern: str) -> str:
    """A pattern that matches whole tags exactly where ``pattern`` matches somewhere in them."""
    head = "" if pattern.startswith("^") else ".*"
    tail = "" if pattern.endswith("$") and not pattern.endswith("\\$") else ".*"
    return pattern if not head and not tail else f"{head}(?:{pattern}){tail}"
