"""Generate the sample corpus that `make run` publishes: ``python -m worker.dev.make_corpus > corpus.jsonl``.

The text is the Python standard library's own documentation, read offline from the docstrings of
its modules, classes and functions with ``inspect``. That text is Copyright (c) Python Software
Foundation and is used under the PSF License Agreement; a handful of short documents in other
languages are written by hand for this project. The selection is fixed and sorted, so one Python
version always produces the same file (other versions word some docstrings differently).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

SOURCE = "python-stdlib"
MIN_CHARS = 200
MAX_CHARS = 8_000
MAX_MEMBERS_PER_MODULE = 9
MAX_METHODS_PER_CLASS = 40

# Tenant -> modules: a handful of tenants, by area of the library.
AREAS: dict[str, tuple[str, ...]] = {
    "concurrency": ("asyncio", "concurrent.futures", "queue", "sched", "selectors", "threading"),
    "data": (
        "array", "bisect", "collections", "configparser", "copy", "csv", "dataclasses", "enum",
        "functools", "gzip", "heapq", "itertools", "json", "operator", "pickle", "struct", "zipfile",
        "zlib",
    ),
    "net": (
        "base64", "hashlib", "hmac", "http.client", "http.server", "ipaddress", "mimetypes", "secrets",
        "smtplib", "socket", "ssl", "urllib.parse", "urllib.request", "uuid",
    ),
    "numeric": ("cmath", "decimal", "fractions", "math", "numbers", "random", "statistics"),
    "system": (
        "abc", "argparse", "contextlib", "fnmatch", "glob", "inspect", "io", "logging", "os", "pathlib",
        "platform", "shutil", "signal", "subprocess", "tempfile", "traceback", "types", "weakref",
    ),
    "text": ("codecs", "difflib", "html", "locale", "re", "string", "textwrap", "unicodedata"),
    "time": ("calendar", "datetime", "time", "zoneinfo"),
}  # fmt: skip

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    tenant: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_event(self) -> dict[str, Any]:
        metadata = dict(self.metadata)
        if not self.text.isascii():
            metadata["non_ascii"] = True
        return {"id": self.id, "text": self.text, "version": 1, "metadata": metadata, "tenant": self.tenant}


def _own_doc(obj: object) -> str | None:
    """The object's own docstring, cleaned; never one inherited from a base class."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _signature(obj: Any) -> str:
    try:
        text = _ADDRESS.sub("", str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return ""
    # Defaults evaluated at import time must not leak this machine's paths into the corpus.
    return text.replace(repr(sys.executable), "sys.executable")


def _cap(text: str) -> str:
    """At most MAX_CHARS, cut at the last paragraph (or line) boundary before the limit."""
    if len(text) <= MAX_CHARS:
        return text
    head = text[:MAX_CHARS]
    cut = head.rfind("\n\n")
    if cut < MAX_CHARS // 2:
        cut = head.rfind("\n")
    return head[: cut if cut > 0 else MAX_CHARS].rstrip()


def _public_names(module: ModuleType) -> list[str]:
    names = getattr(module, "__all__", None) or dir(module)
    return sorted({n for n in names if not n.startswith("_")})


def _class_text(qualname: str, cls: type, doc: str | None) -> str:
    parts = [f"class {qualname}{_signature(cls)}"]
    if doc:
        parts.append(doc)
    methods = []
    for name in sorted(vars(cls)):
        if name.startswith("_") and name != "__init__":
            continue
        member = vars(cls)[name]
        method_doc = _own_doc(member)
        if method_doc and (inspect.isroutine(member) or isinstance(member, property)):
            signature = "" if isinstance(member, property) else _signature(member)
            body = "\n".join(f"    {line}" if line else "" for line in method_doc.splitlines())
            methods.append(f"{name}{signature}\n{body}")
    parts.extend(methods[:MAX_METHODS_PER_CLASS])
    return "\n\n".join(parts)


def module_documents(tenant: str, module_name: str) -> Iterator[Document]:
    module = importlib.import_module(module_name)
    meta = {"source": SOURCE, "module": module_name, "language": "en"}
    module_doc = _own_doc(module)
    if module_doc and len(module_doc) >= MIN_CHARS:
        text = _cap(f"Module {module_name}\n\n{module_doc}")
        yield Document(
            f"{SOURCE}/{module_name}", text, tenant, {"title": module_name, "kind": "module", **meta}
        )
    count = 0
    for name in _public_names(module):
        if count >= MAX_MEMBERS_PER_MODULE:
            break
        obj = getattr(module, name, None)
        qualname = f"{module_name}.{name}"
        doc = _own_doc(obj)
        if inspect.isclass(obj):
            kind, text = "class", _class_text(qualname, obj, doc)
        elif inspect.isroutine(obj) and doc:
            kind, text = "function", f"{qualname}{_signature(obj)}\n\n{doc}"
        else:
            continue
        if len(text) < MIN_CHARS:
            continue
        count += 1
        yield Document(f"{SOURCE}/{qualname}", _cap(text), tenant, {"title": qualname, "kind": kind, **meta})


# Written for this project: short notes in other languages, with accents, combining marks, CJK,
# Cyrillic and emoji (some beyond the Basic Multilingual Plane) to exercise Unicode handling.
MULTILINGUAL: tuple[tuple[str, str, str, str], ...] = (
    (
        "de",
        "json",
        "data",
        "Das Modul json liest und schreibt das JSON-Format. Die Funktion json.dumps() wandelt ein "
        "Python-Objekt in eine Zeichenkette um, json.loads() macht daraus wieder Objekte. Mit "
        "ensure_ascii=False bleiben Umlaute wie ä, ö, ü und das scharfe ß unverändert erhalten; "
        "sonst werden sie als \\u-Escape-Sequenzen ausgegeben. Große Dateien liest man besser "
        "zeilenweise, etwa im Format JSON Lines, bei dem jede Zeile genau ein Objekt enthält.",
    ),
    (
        "fr",
        "pathlib",
        "system",
        "Le module pathlib représente les chemins du système de fichiers sous forme d'objets. "
        "Path.home() renvoie le répertoire personnel de l'utilisateur, et l'opérateur / permet de "
        "composer des chemins sans se soucier du séparateur. Attention : un nom comme « cafe\u0301.txt » "
        "écrit avec un accent combinant n'est pas identique, octet pour octet, à « café.txt » en "
        "forme précomposée ; unicodedata.normalize('NFC', nom) les rend égaux avant la comparaison.",
    ),
    (
        "ja",
        "asyncio",
        "concurrency",
        "asyncio は async/await 構文を使って並行処理のコードを書くためのライブラリです。"
        "イベントループがコルーチンを順番に実行し、ネットワーク通信やファイル入出力の待ち時間の間に"
        "別のタスクを進めます。asyncio.run() はトップレベルのエントリーポイントで、"
        "asyncio.gather() は複数のコルーチンを同時に待ちます。CPU を多く使う処理は "
        "asyncio.to_thread() でスレッドに移すと、イベントループを止めずに済みます。",
    ),
    (
        "es",
        "collections",
        "data",
        "El módulo collections ofrece contenedores especializados además de dict, list, set y tuple. "
        "Counter cuenta elementos hashables, deque permite añadir y quitar por ambos extremos en "
        "tiempo constante, y defaultdict crea valores por defecto al acceder a una clave que no "
        "existe. ¿Necesitas tuplas con nombre? namedtuple() genera clases ligeras y legibles.",
    ),
    (
        "ru",
        "hashlib",
        "net",
        "Модуль hashlib предоставляет единый интерфейс к алгоритмам хеширования: SHA-256, SHA-3, "
        "BLAKE2 и другим. Функция hashlib.blake2b() принимает параметр digest_size, поэтому "
        "можно получить короткий и при этом надёжный отпечаток данных. Для хранения паролей "
        "используйте hashlib.scrypt() или pbkdf2_hmac() с солью, а не простой хеш.",  # noqa: RUF001 - Russian words, not look-alikes
    ),
    (
        "mul",
        "unicodedata",
        "text",
        "Unicode in practice 🐍✨: the string 'naïve café' has 10 code points; 'e\u0301' is two code "
        "points that render as one. Emoji such as 🚀, 👩\u200d💻 (a ZWJ sequence of three code points) "
        "and flags like 🇯🇵 lie beyond the Basic Multilingual Plane, so UTF-16 needs surrogate pairs "
        "while Python indexes them as single characters. unicodedata.name('🐍') returns 'SNAKE'; "
        "Ελληνικά, עברית, العربية and 한국어 all round-trip through UTF-8 unchanged.",
    ),
)


def multilingual_documents() -> Iterator[Document]:
    for language, module, tenant, text in MULTILINGUAL:
        yield Document(
            f"{SOURCE}-i18n/{language}/{module}",
            text,
            tenant,
            {
                "title": f"{module} ({language})",
                "source": f"{SOURCE}-i18n",
                "module": module,
                "kind": "note",
                "language": language,
            },
        )


def documents() -> list[Document]:
    docs = [
        doc
        for tenant in sorted(AREAS)
        for name in sorted(AREAS[tenant])
        for doc in module_documents(tenant, name)
    ]
    docs.extend(multilingual_documents())
    seen: set[str] = set()
    for doc in docs:
        if doc.id in seen or not doc.text.strip() or len(doc.id.encode()) > 512:
            raise ValueError(f"bad or duplicate document {doc.id!r}")
        seen.add(doc.id)
    return docs


def main() -> int:
    out = sys.stdout
    for doc in documents():
        out.write(json.dumps(doc.as_event(), ensure_ascii=False) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
