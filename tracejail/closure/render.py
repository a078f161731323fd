"""The lddtree-like view of a closure (`tracejail deps`)."""
from __future__ import annotations

from .model import Closure, Dependency, Unresolved


_QUIET_RULES = ("ld.so.cache", "default")


def _describe(dep: Dependency) -> str:
    if dep.rule in _QUIET_RULES:
        return ""
    tag = dep.rule + (" $ORIGIN" if dep.via_origin else "")
    text = f" [{tag}]"
    if dep.rule.startswith("runtime:") and dep.reason:
        text += f" ({dep.reason})"
    return text


def format_tree(closure: Closure) -> str:
    """An lddtree-like view: each root, then what it needs, indented.

    Each file appears once per root, under the object that made the loader
    load it first (the breadth-first order ld.so itself follows).
    """
    children: dict[str, list[Dependency]] = {}
    for dep in closure.deps:
        children.setdefault(dep.needed_by, []).append(dep)
    missing: dict[str, list[Unresolved]] = {}
    for item in closure.unresolved:
        missing.setdefault(item.needed_by, []).append(item)
    lines: list[str] = []

    for root in closure.roots:
        interp = next((d for d in children.get(root, []) if d.rule == "interp"), None)
        lines.append(root + (f" (interpreter => {interp.path})" if interp else ""))
        # Breadth first: the first object to reach a file becomes its parent.
        seen = {root} | ({interp.path} if interp else set())
        tree: dict[str, list[Dependency]] = {}
        queue = [root]
        while queue:
            node = queue.pop(0)
            for dep in children.get(node, []):
                if dep.path in seen:
                    continue
                seen.add(dep.path)
                tree.setdefault(node, []).append(dep)
                queue.append(dep.path)

        def walk(node: str, depth: int) -> None:
            indent = "    " * depth
            for dep in tree.get(node, []):
                lines.append(f"{indent}{dep.name} => {dep.path}{_describe(dep)}")
                walk(dep.path, depth + 1)
            for item in missing.get(node, []):
                lines.append(f"{indent}{item.name} => not found")

        walk(root, 1)
    for error in closure.errors:
        lines.append(f"error: {error}")
    for item in closure.unresolved:
        searched = ", ".join(item.searched) or "nothing"
        lines.append(f"not found: {item.name} (needed by {item.needed_by}; searched {searched})")
    return "\n".join(lines) + ("\n" if lines else "")
