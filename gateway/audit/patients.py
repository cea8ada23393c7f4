"""Which patients a document concerns: identifiers read from its first bytes.

Recognised by content, not by the declared media type (an outbox file is often
``application/octet-stream``):

* HL7 v2 (ER7, optionally MLLP-framed, batches too): every repetition of PID-3
  (patient identifier list), each with its assigning authority (CX.4, the
  namespace, else the universal id) and identifier type (CX.5).  PID-2 too,
  where an older message still carries the number there.  Only fields 1 to 3
  of a PID segment are read: Japanese names later in the segment may be in
  ISO-2022-JP or Shift_JIS, whose bytes can look like delimiters.
* HL7 CDA R2 (``ClinicalDocument`` in ``urn:hl7-org:v3``: Japanese referral
  letters and discharge summaries): every ``recordTarget/patientRole/id``,
  ``@extension`` as the id and ``@root`` (an OID) as the authority; an id with
  a root only is the root.
* FHIR, JSON or XML: ``Patient.identifier`` (system, value, type) of a Patient
  resource, or of each Patient in a Bundle's entries.

XML is read with the stdlib expat parser, refusing any document type
declaration (so no entity, internal or external, is ever expanded), with the
element nesting bounded.  Only the first ``SCAN_BYTES`` of a document are read
(the header of a CDA document, the PID segment, the Patient entry of a FHIR
document are at its start), and at most ``MAX_IDS`` identifiers of at most
``MAX_ID_CHARS`` characters each are kept: whatever a document holds, the work
and the record are bounded.  A document in no known format, or malformed,
names no patient; that is not an error (most documents sent are not HL7).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.parsers import expat

from gateway.audit.events import PatientId
from gateway.errors import InvalidValueError

SCAN_BYTES = 256 * 1024  # of a document's beginning
MAX_IDS = 32  # identifiers kept per document
MAX_ID_CHARS = 200  # of one id, authority or type
MAX_XML_DEPTH = 64  # nested elements
MAX_JSON_ENTRIES = 1000  # Bundle entries looked at

CDA_NS = "urn:hl7-org:v3"
FHIR_NS = "http://hl7.org/fhir"
_MLLP_START = b"\x0b"


def patients_in(prefix: bytes) -> tuple[PatientId, ...]:
    """The patient identifiers in a document's first bytes (up to SCAN_BYTES are read)."""
    head = prefix[:SCAN_BYTES]
    found: list[PatientId] = []
    try:
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            found = _xml(head)  # expat reads UTF-16 by its byte order mark
        else:
            start = head.removeprefix(codecs.BOM_UTF8).lstrip(b" \t\r\n" + _MLLP_START)
            if start[:3] in (b"MSH", b"FHS", b"BHS"):
                found = _hl7v2(start)
            elif start[:1] == b"{":
                found = _fhir_json(start.decode("utf-8", errors="replace"))
            elif start[:1] == b"<":
                found = _xml(start)
    except (ValueError, RecursionError, UnicodeError, LookupError):
        found = []  # not what it looked like: names no patient
    return unique_patients(found)


def patients_in_chunks(chunks: Iterator[bytes]) -> tuple[PatientId, ...]:
    """The patient identifiers in a document given as chunks: only as many are taken as
    make up SCAN_BYTES (a generator is closed then, and its file with it)."""
    head = bytearray()
    try:
        for chunk in chunks:
            head += chunk[: SCAN_BYTES - len(head)]
            if len(head) >= SCAN_BYTES:
                break
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return patients_in(bytes(head))


def patients_in_file(path: Path) -> tuple[PatientId, ...]:
    """The patient identifiers in a document file (its first SCAN_BYTES are read)."""
    with path.open("rb") as handle:
        return patients_in(handle.read(SCAN_BYTES))


PATIENT_HEADER = "X-Medgw-Patient"


DECLARED_FIX = (
    "send each patient as AUTHORITY|ID (e.g. urn:oid:1.2.392.100495.20.3.51.1|12345) "
    f"or ID, separated by commas, at most {MAX_IDS}; or leave the header out"
)


def declared_patients(values: list[str]) -> tuple[PatientId, ...]:
    """The patients a local submitter names in PATIENT_HEADER: ``AUTHORITY|ID`` or ``ID``,
    several separated by commas or in several headers.  Raises InvalidValueError saying
    what is wrong and how to send them (the caller answers 400)."""
    found: list[PatientId] = []
    for value in values:
        for item in value.split(","):
            authority, _, patient = item.strip().rpartition("|")
            if not patient.strip() or len(found) >= MAX_IDS:
                raise InvalidValueError(
                    "an empty patient identifier"
                    if len(found) < MAX_IDS
                    else f"more than {MAX_IDS} patient identifiers",
                    fix=DECLARED_FIX,
                )
            for text in (authority, patient):
                if len(text) > MAX_ID_CHARS or not all(c.isprintable() for c in text):
                    raise InvalidValueError(
                        f"a patient identifier or authority longer than {MAX_ID_CHARS} "
                        "characters, or with control characters",
                        fix=DECLARED_FIX,
                    )
            found.append(PatientId(patient.strip(), "client", authority.strip() or None))
    return unique_patients(found)


def _clean(text: str) -> str | None:
    if not text.isprintable():  # else all of it is kept: no look at each character
        text = "".join(c for c in text if c.isprintable())
    return text.strip()[:MAX_ID_CHARS] or None


def unique_patients(found: list[PatientId]) -> tuple[PatientId, ...]:
    """``found`` without repeats, at most MAX_IDS."""
    seen: dict[tuple[str, str | None, str | None, str], PatientId] = {}
    for patient in found:
        seen.setdefault((patient.id, patient.authority, patient.type, patient.source), patient)
        if len(seen) >= MAX_IDS:
            break
    return tuple(seen.values())


def _add(
    found: list[PatientId], value: str, source: str, authority: str = "", kind: str = ""
) -> None:
    cleaned = _clean(value)
    if cleaned is not None and len(found) < MAX_IDS * 4:
        found.append(PatientId(cleaned, source, _clean(authority), _clean(kind)))


# -- HL7 v2 ------------------------------------------------------------------


# The segments _hl7v2 reads (a header, which sets the separators, or a PID), each after a
# CR (the text begins with one, and its LFs are made CRs): the others (OBX, ...; most of a
# message) are passed over by a search for one character, not split off one by one.
_SEGMENTS = re.compile(r"\r((?:MSH|FHS|BHS|PID)[^\r]*)")


def _hl7v2(data: bytes) -> list[PatientId]:
    """PID-3 (and PID-2) of every PID segment of a message or batch."""
    text = data.decode("latin-1")  # separators are ASCII; ids are decoded again below
    found: list[PatientId] = []
    field = component = repetition = escape = subcomponent = ""
    for match in _SEGMENTS.finditer("\r" + text.replace("\n", "\r")):
        segment = match[1]
        if len(found) >= MAX_IDS * 4:
            break  # enough: the rest is not read
        name = segment[:3]
        if name in ("MSH", "FHS", "BHS") and len(segment) >= 8:
            field = segment[3]
            encoding = segment[4:].split(field, 1)[0][:4]  # MSH-2, default ^~\&
            component, repetition, escape, subcomponent = [
                encoding[i] if len(encoding) > i else "^~\\&"[i] for i in range(4)
            ]
            continue
        if name != "PID" or not field or segment[3:4] != field:
            continue
        fields = segment.split(field, 4)
        for number in (3, 2):
            if len(fields) <= number:
                continue
            for cx in fields[number].split(repetition):
                parts = cx.split(component)

                parts += [""] * (5 - len(parts))
                # CX.4 is an HD: namespace id & universal id & its type; the name, else the id
                hd = [*parts[3].split(subcomponent), "", ""][:2]
                authority = _unescape(hd[0] or hd[1], escape, field, component)
                value = _unescape(parts[0], escape, field, component)
                _add(
                    found, value, "hl7v2", authority, _unescape(parts[4], escape, field, component)
                )
    return found


def _unescape(value: str, escape: str, field: str, component: str) -> str:
    """HL7 escape sequences (\\F\\, \\S\\, \\T\\, \\R\\, \\E\\); others are dropped."""
    raw = value.encode("latin-1")
    text = raw.decode("utf-8", errors="replace")
    if not escape or escape not in text:
        return text
    out: list[str] = []
    pieces = text.split(escape)
    out.append(pieces[0])
    index = 1
    while index < len(pieces):
        code = pieces[index]
        rest = pieces[index + 1] if index + 1 < len(pieces) else ""
        out.append({"F": field, "S": component, "T": "&", "R": "~", "E": escape}.get(code, ""))
        out.append(rest)
        index += 2
    return "".join(out)


# -- XML: CDA and FHIR ---------------------------------------------------------


class _Stop(Exception):
    """The scan is done (or refused): stop feeding the parser."""


class _XmlScan:
    def __init__(self) -> None:
        self.found: list[PatientId] = []
        self.path: list[str] = []  # element names without the document's namespace
        self.kind: str | None = None
        self.identifier: dict[str, str] | None = None  # a FHIR Patient.identifier being read
        self.identifier_depth = 0

    def start(self, name: str, attributes: dict[str, str]) -> None:
        if len(self.path) >= MAX_XML_DEPTH:
            raise _Stop("too deeply nested")
        if not self.path:
            if name == f"{CDA_NS} ClinicalDocument":
                self.kind = "cda"
            elif name in (f"{FHIR_NS} Bundle", f"{FHIR_NS} Patient"):
                self.kind = "fhir"
            else:
                raise _Stop("not CDA or FHIR")
        namespace = CDA_NS if self.kind == "cda" else FHIR_NS
        local = name.removeprefix(f"{namespace} ") if name.startswith(namespace) else name
        self.path.append(local)
        if self.kind == "cda":
            self._cda(attributes)
        else:
            self._fhir(attributes)

    def end(self, _name: str) -> None:
        if self.identifier is not None and len(self.path) == self.identifier_depth:
            found = self.identifier
            system, kind = found.get("system", ""), found.get("type", "")
            _add(self.found, found.get("value", ""), "fhir", system, kind)
            self.identifier = None
        self.path.pop()

    def _cda(self, attributes: dict[str, str]) -> None:
        if self.path[1:] == ["component"]:
            raise _Stop("the header is over")  # the body follows: no more recordTarget
        if self.path[1:] == ["recordTarget", "patientRole", "id"]:
            extension = attributes.get("extension", "")
            root = attributes.get("root", "")
            if extension:
                _add(self.found, extension, "cda", root)
            elif root:
                _add(self.found, root, "cda")  # an id of a root only is the root

    def _fhir(self, attributes: dict[str, str]) -> None:
        if self.identifier is None:
            if self.path in (["Patient", "identifier"], _BUNDLED_PATIENT_IDENTIFIER):
                self.identifier = {}
                self.identifier_depth = len(self.path)
            return
        inner = self.path[self.identifier_depth :]
        value = attributes.get("value", "")
        if inner == ["system"]:
            self.identifier["system"] = value
        elif inner == ["value"]:
            self.identifier["value"] = value
        elif inner == ["type", "coding", "code"] and "type" not in self.identifier:
            self.identifier["type"] = value


_BUNDLED_PATIENT_IDENTIFIER = ["Bundle", "entry", "resource", "Patient", "identifier"]


def _refuse_dtd(*_args: object) -> None:
    raise _Stop("a document type declaration")


_DECLARED = re.compile(rb"^<\?xml[^>]*encoding\s*=\s*[\"']([A-Za-z0-9._-]+)[\"']")
_EXPAT_ENCODINGS = frozenset({"utf_8", "utf_16", "ascii", "latin_1"})  # codecs' names


def _xml(data: bytes) -> list[PatientId]:
    """Identifiers of a CDA or FHIR XML document.  One in an encoding expat lacks
    (Shift_JIS, EUC-JP, ISO-2022-JP: Japanese documents) is decoded by Python's codec
    first, and handed to expat as UTF-8."""
    declared = _DECLARED.match(data)
    encoding = None
    if declared is not None:
        name = codecs.lookup(declared.group(1).decode("ascii")).name.replace("-", "_")
        if name not in _EXPAT_ENCODINGS:
            data = data.decode(name, errors="replace").encode("utf-8")
            encoding = "UTF-8"  # overrides the declaration
    scan = _XmlScan()
    parser = _safe_parser(encoding)
    parser.StartElementHandler = scan.start
    parser.EndElementHandler = scan.end
    try:
        parser.Parse(data, False)
    except _Stop:
        pass
    except expat.ExpatError:
        pass  # malformed, or cut off at SCAN_BYTES: keep what was found before
    if scan.kind is None:
        return []
    return scan.found


def _safe_parser(encoding: str | None) -> Any:
    """An expat parser that refuses any DTD (hence every entity, internal or external)
    and never loads anything."""
    parser = expat.ParserCreate(encoding, namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    refuse: Callable[..., Any] = _refuse_dtd
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    return parser


# -- FHIR JSON ----------------------------------------------------------------


def _fhir_json(text: str) -> list[PatientId]:
    """Patient.identifier of a Patient, or of each Patient entry of a Bundle.  A Bundle cut
    off at SCAN_BYTES is read entry by entry up to the cut."""
    decoder = json.JSONDecoder()
    try:
        whole = decoder.decode(text)
    except ValueError:
        whole = None
    found: list[PatientId] = []
    if isinstance(whole, dict):
        if whole.get("resourceType") == "Patient":
            _patient_json(whole, found)
        elif whole.get("resourceType") == "Bundle":
            for entry in (whole.get("entry") or [])[:MAX_JSON_ENTRIES]:
                if isinstance(entry, dict):
                    _patient_json(entry.get("resource"), found)
        return found
    for resource in _entries_of_cut_bundle(text, decoder):
        _patient_json(resource, found)
    return found


_SPACE = re.compile(r"\s*")


def _entries_of_cut_bundle(text: str, decoder: json.JSONDecoder) -> list[Any]:
    """The resources of the complete entries before the cut, if ``text`` begins a Bundle."""
    at = _SPACE.match(text, 1).end()  # type: ignore[union-attr]
    members: dict[str, Any] = {}
    while at < len(text) and text[at] == '"':
        key, at = decoder.raw_decode(text, at)
        at = _SPACE.match(text, at).end()  # type: ignore[union-attr]
        if text[at : at + 1] != ":":
            return []
        at = _SPACE.match(text, at + 1).end()  # type: ignore[union-attr]
        if key == "entry" and text[at : at + 1] == "[":
            break
        value, at = decoder.raw_decode(text, at)
        members[key] = value
        at = _SPACE.match(text, at).end()  # type: ignore[union-attr]
        if text[at : at + 1] != ",":
            return []
        at = _SPACE.match(text, at + 1).end()  # type: ignore[union-attr]
    else:
        return []
    if members.get("resourceType") != "Bundle":
        return []
    resources: list[Any] = []
    at += 1
    while len(resources) < MAX_JSON_ENTRIES:
        at = _SPACE.match(text, at).end()  # type: ignore[union-attr]
        try:
            entry, at = decoder.raw_decode(text, at)
        except ValueError:
            break  # the cut
        if isinstance(entry, dict):
            resources.append(entry.get("resource"))
        at = _SPACE.match(text, at).end()  # type: ignore[union-attr]
        if text[at : at + 1] != ",":
            break
        at += 1
    return resources


def _patient_json(resource: Any, found: list[PatientId]) -> None:
    if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
        return
    identifiers = resource.get("identifier")
    if not isinstance(identifiers, list):
        return
    for identifier in identifiers[:MAX_IDS]:
        if not isinstance(identifier, dict):
            continue
        value = identifier.get("value")
        if not isinstance(value, str):
            continue
        system = identifier.get("system")
        kind = ""
        coding = (
            (identifier.get("type") or {}).get("coding")
            if isinstance(identifier.get("type"), dict)
            else None
        )
        if isinstance(coding, list) and coding and isinstance(coding[0], dict):
            code = coding[0].get("code")
            kind = code if isinstance(code, str) else ""
        _add(found, value, "fhir", system if isinstance(system, str) else "", kind)
