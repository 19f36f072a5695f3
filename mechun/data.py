"""Loaders for real unlearning and editing benchmarks stored as local files.

Three formats, each in the schema its public release uses, so a downloaded copy loads without conversion:

* **Multiple choice** (:func:`load_mcq`): WMDP (``cais/wmdp``) and MMLU (``cais/mmlu``) as published on the HF hub --
  ``question``, four ``choices``, ``answer`` (an index 0-3; letter answers "A"-"D" of MMLU variants are accepted too),
  optional ``subject`` -- in JSON Lines, a JSON array or parquet.
* **CounterFact** (:func:`load_counterfact`): ROME's ``counterfact.json`` (Meng et al. 2022): a requested rewrite
  (prompt template with ``{}``, subject, new and true target) plus paraphrase, neighbourhood and attribute prompts.
* **Question answering, TOFU format** (:func:`load_qa`): ``locuslab/TOFU`` and the open-unlearning splits
  (``forget10.json``, ``retain90.json``, ``*_perturbed.json``): ``question`` and ``answer`` strings, optional
  ``paraphrased_question``, ``paraphrased_answer`` and ``perturbed_answer`` (a list of wrong answers). The hub
  ships these as JSON Lines under a ``.json`` name; both that and a JSON array load, as do ``.jsonl`` and parquet.
  :func:`qa_prompts` renders the questions with the model's prompt template.
* **Sports facts** (:func:`load_sports_facts`): the athlete -> sport CSV of the fact-finding and localized-unlearning
  work (Nanda et al. 2023, "Fact Finding"; Guo et al. 2024).

Plain prompt files (:func:`read_prompts`), one prompt per line, feed caching and junk-direction diagnosis.

Every loader reads the whole file and validates *every* record before returning anything: one bad record raises
:class:`DataError` naming the file, the record (1-based line for JSONL and CSV, counting a CSV header as line 1;
0-based ``record N`` for JSON arrays and parquet rows), the field and what was expected. An evaluation run on a
silently truncated or half-parsed benchmark would report numbers for data nobody chose, so nothing is ever returned
partially.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechun.errors import MechunError
from mechun.organism.world import LETTERS, MCQ, MCQ_STYLES

__all__ = [
    "QA", "QA_TEMPLATES", "CounterFactRecord", "DataError", "DataFileNotFoundError", "SportsFact", "load_counterfact",
    "load_mcq", "load_qa", "load_sports_facts", "qa_prompts", "read_prompts", "sports_prompts", "write_jsonl",
]


class DataError(MechunError, ValueError):
    """A data file that cannot be loaded: the message names the file, the record, the field and the fix."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """No file at the given path; also a ``FileNotFoundError`` so generic ``except`` clauses keep working."""


# -- reading ---------------------------------------------------------------------------------------------------------
def _existing_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataFileNotFoundError(f"no file at {p}; check the path (relative paths are from {Path.cwd()})")
    if not p.is_file():
        raise DataError(f"{p} is not a regular file; pass the path of the data file itself")
    return p


def _check_path(path: str | Path, formats: Mapping[str, str]) -> Path:
    """Fail on a missing file or an extension the loader cannot read, before any parsing is attempted."""
    p = _existing_file(path)
    if p.suffix.lower() not in formats:
        known = ", ".join(f"{ext} ({what})" for ext, what in formats.items())
        raise DataError(f"{p}: unknown extension {p.suffix or '(none)'!r}; expected one of {known}")
    return p


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from e


def _no_records(p: Path, expect: str) -> DataError:
    return DataError(f"{p}: empty file (no records); expected {expect}")


def _json_lines(p: Path, text: str) -> list[tuple[str, Any]]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # a trailing or separating blank line is not a record
        try:
            out.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{p} line {n}: invalid JSON ({e.msg} at column {e.colno}); "
                            "expected one JSON object per line") from e
    return out


def _records(p: Path, expect: str, json_lines_ok: bool = False) -> list[tuple[str, Any]]:
    """``(where, raw record)`` pairs of a JSONL, JSON-array or parquet file; ``where`` is how errors cite it.
    ``json_lines_ok``: a ``.json`` file may hold JSON Lines (as the TOFU files on the hub do)."""
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{p}: reading parquet needs pyarrow; pip install pyarrow") from e
        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
            raise DataError(f"{p}: cannot be read as parquet ({e}); expected a parquet table") from e
        out = [(f"record {i}", r) for i, r in enumerate(rows)]
    elif suffix == ".jsonl":
        out = _json_lines(p, _read_text(p))
    else:
        text = _read_text(p)
        if not text.strip():
            raise _no_records(p, expect)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if json_lines_ok and e.msg == "Extra data":
                return _json_lines(p, text)
            hint = " (it looks like JSON Lines: rename it to .jsonl)" if e.msg == "Extra data" else ""
            raise DataError(f"{p} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}){hint}; "
                            "expected a JSON array of records") from e
        if json_lines_ok and isinstance(data, dict):  # a one-line JSON Lines file, or records wrapped in an object
            wrapped = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
            if wrapped:
                raise DataError(f"{p}: top level is a JSON object whose field '{wrapped[0]}' holds "
                                f"{len(data[wrapped[0]])} records; save the records themselves, as a JSON array or "
                                "JSON Lines")
            return _json_lines(p, text)
        if not isinstance(data, list):
            raise DataError(f"{p}: top level is a JSON {type(data).__name__}; expected a JSON array of records")
        out = [(f"record {i}", r) for i, r in enumerate(data)]
    if not out:
        raise _no_records(p, expect)
    return out


def _describe(v: Any) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r if len(r) <= 60 else r[:57] + '...'}"


class _Record:
    """One raw record and where it came from, so every complaint names file, record and field."""

    def __init__(self, path: Path, where: str, raw: Any):
        if not isinstance(raw, dict):
            raise DataError(f"{path} {where}: record is {_describe(raw)}; expected an object of named fields")
        self.path, self.where, self.raw = path, where, raw

    def fail(self, name: str, problem: str, expect: str) -> DataError:
        return DataError(f"{self.path} {self.where}: field '{name}' {problem}; expected {expect}")

    def get(self, name: str, expect: str, required: bool = True) -> Any:
        """The value at dotted ``name``; ``None`` for an absent optional field (null counts as absent)."""
        node: Any = self.raw
        parts = name.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict):
                raise self.fail(".".join(parts[:i]), f"is {_describe(node)}", f"an object with a '{part}' field")
            if part not in node or node[part] is None:
                if not required:
                    return None
                raise self.fail(name, "is missing" if part not in node else "is null", expect)
            node = node[part]
        return node

    def text(self, name: str, expect: str = "a non-empty string", required: bool = True) -> str | None:
        v = self.get(name, expect, required)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self.fail(name, f"is {_describe(v)}", expect)
        if not v.strip():
            raise self.fail(name, "is empty", expect)
        return v

    def integer(self, name: str, expect: str) -> int:
        v = self.get(name, expect)
        if isinstance(v, bool) or not isinstance(v, int):  # bool is an int subclass, but True is no index
            raise self.fail(name, f"is {_describe(v)}", expect)
        return v

    def strings(self, name: str, required: bool = False) -> tuple[str, ...]:
        expect = "a list of strings" + ("" if required else " (or the field left out)")
        v = self.get(name, expect, required)
        if v is None:
            return ()
        if not isinstance(v, list | tuple):
            raise self.fail(name, f"is {_describe(v)}", expect)
        for i, s in enumerate(v):
            if not isinstance(s, str):
                raise self.fail(f"{name}[{i}]", f"is {_describe(s)}", "a string")
        return tuple(v)


# -- multiple choice (WMDP, MMLU) ------------------------------------------------------------------------------------
_MCQ_FORMATS = {".jsonl": "JSON Lines", ".json": "JSON array", ".parquet": "parquet"}
_MCQ_EXPECT = "records with 'question', 'choices' (4 strings) and 'answer' (0-3), as in cais/wmdp and cais/mmlu"
_CHOICES = f"a list of exactly {len(LETTERS)} non-empty strings (the MCQ formats have the letters A-D)"
_ANSWER = "an integer index 0-3 into 'choices' (or a letter 'A'-'D')"


def _answer_index(rec: _Record) -> int:
    v = rec.get("answer", _ANSWER)
    if isinstance(v, str) and v.strip().upper() in LETTERS:
        return LETTERS.index(v.strip().upper())
    if isinstance(v, int) and not isinstance(v, bool):
        if 0 <= v < len(LETTERS):
            return v
        raise rec.fail("answer", f"is {v} (out of range)", _ANSWER)
    raise rec.fail("answer", f"is {_describe(v)}", _ANSWER)


def load_mcq(path: str | Path, style: str = "mmlu", subject: str | None = None) -> list[MCQ]:
    """WMDP / MMLU-style questions as :class:`~mechun.organism.world.MCQ`, rendered with ``MCQ_STYLES[style]``.

    ``subject`` keeps only records whose ``subject`` field equals it; all records are validated first, so a bad
    record of another subject still fails the load (the file is broken either way). ``source`` of each question is
    ``"<file name>:<line N | record N>"``, the same citation an error would use.
    """
    if style not in MCQ_STYLES:
        raise DataError(f"unknown MCQ style {style!r}; expected one of {sorted(MCQ_STYLES)}")
    p = _check_path(path, _MCQ_FORMATS)
    out: list[tuple[str | None, MCQ]] = []
    for where, raw in _records(p, _MCQ_EXPECT):
        rec = _Record(p, where, raw)
        question = rec.text("question", "a non-empty string (the question stem)")
        choices = rec.get("choices", _CHOICES)
        if not isinstance(choices, list | tuple):
            raise rec.fail("choices", f"is {_describe(choices)}", _CHOICES)
        if len(choices) != len(LETTERS):
            raise rec.fail("choices", f"has {len(choices)} items", _CHOICES)
        for i, c in enumerate(choices):
            if not isinstance(c, str) or not c.strip():
                raise rec.fail(f"choices[{i}]", "is empty" if isinstance(c, str) else f"is {_describe(c)}",
                               _CHOICES)
        answer = _answer_index(rec)
        subj = rec.text("subject", "a string naming the subject (or the field left out)", required=False)
        stem, opts = question.strip(), tuple(choices)
        out.append((subj, MCQ(text=MCQ_STYLES[style](stem, opts), choices=opts, answer_index=answer,
                              question=stem, style=style, source=f"{p.name}:{where}")))
    if subject is None:
        return [q for _, q in out]
    kept = [q for s, q in out if s == subject]
    if not kept:
        found = sorted({s for s, _ in out if s is not None})
        raise DataError(f"{p}: no record has subject {subject!r}; subjects in the file: {found or 'none'}")
    return kept


# -- question answering (TOFU) --------------------------------------------------------------------------------------
_QA_FORMATS = {".json": "JSON array or JSON Lines", ".jsonl": "JSON Lines", ".parquet": "parquet"}
_QA_EXPECT = "records with 'question' and 'answer' strings, as in locuslab/TOFU (forget10.json, retain90.json)"

#: Prompt templates of common chat formats; ``{question}`` is replaced, the answer follows after one space.
QA_TEMPLATES: dict[str, str] = {
    "plain": "Question: {question}\nAnswer:",
    "llama2-chat": "[INST] {question} [/INST]",  # open-unlearning's tofu_Llama-2-7b-chat-hf
    "raw": "{question}",
}


@dataclass(frozen=True)
class QA:
    """One question-answer pair of a TOFU-format file. ``perturbed_answers`` are TOFU's wrong answers (for the
    truth ratio); ``source`` is ``"<file name>:<line N | record N>"``."""

    question: str
    answer: str
    paraphrased_question: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    source: str = ""


def load_qa(path: str | Path) -> list[QA]:
    """TOFU-format question-answer pairs (see the module docstring); every record is validated before any is
    returned."""
    p = _check_path(path, _QA_FORMATS)
    out = []
    for where, raw in _records(p, _QA_EXPECT, json_lines_ok=True):
        rec = _Record(p, where, raw)
        opt = "a non-empty string (or the field left out)"
        perturbed = rec.get("perturbed_answer", "a list of strings (or the field left out)", required=False)
        out.append(QA(
            question=rec.text("question", "a non-empty string (the question)").strip(),
            answer=rec.text("answer", "a non-empty string (the answer)").strip(),
            paraphrased_question=rec.text("paraphrased_question", opt, required=False),
            paraphrased_answer=rec.text("paraphrased_answer", opt, required=False),
            perturbed_answers=((perturbed,) if isinstance(perturbed, str) else rec.strings("perturbed_answer")),
            source=f"{p.name}:{where}"))
    return out


def qa_template(template: str) -> str:
    """A template name of :data:`QA_TEMPLATES` or a template string with exactly one ``{question}``."""
    template = QA_TEMPLATES.get(template, template)
    if template.count("{question}") != 1:
        raise DataError(f"QA template {template!r} must contain '{{question}}' exactly once, or be one of "
                        f"{sorted(QA_TEMPLATES)}")
    try:
        template.format(question="")
    except (IndexError, KeyError, ValueError) as e:
        raise DataError(f"QA template {template!r} has a placeholder other than '{{question}}' ({e}); "
                        "write a literal brace as '{{' or '}}'") from e
    return template


def qa_prompts(questions: Iterable[QA], template: str = "plain", paraphrased: bool = False,
               ) -> tuple[list[str], list[str]]:
    """``(prompts, answers)``: each question rendered with ``template`` (a :data:`QA_TEMPLATES` name or a string
    with ``{question}``) and its answer. ``paraphrased``: the paraphrased questions instead, with the original
    answers, for the records that have one (TOFU's ``*_perturbed`` splits)."""
    template = qa_template(template)
    pairs = [(q.paraphrased_question, q.answer) for q in questions if q.paraphrased_question] if paraphrased else [
        (q.question, q.answer) for q in questions]
    return [template.format(question=t) for t, _ in pairs], [a for _, a in pairs]


# -- CounterFact -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CounterFactRecord:
    """One CounterFact case: rewrite ``prompt.format(subject)`` from ``target_true`` to ``target_new``.

    ``paraphrase_prompts`` test generalisation of the edit, ``neighborhood_prompts`` (other subjects, same relation
    and true target) test its specificity, ``attribute_prompts`` (other subjects that really have ``target_new``)
    are the reference for ``target_new`` statements; ``generation_prompts`` seed fluency/consistency checks.
    """

    case_id: int
    subject: str
    prompt: str  # template with one "{}" where the subject goes
    target_new: str
    target_true: str
    relation_id: str = ""
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)

    @property
    def edit_statement(self) -> str:
        return f"{self.rewrite_prompt} {self.target_new}."

    def dynamic_prompts(self) -> list[str]:
        """CounterFact+ neighbourhood prompts: the edit statement in context first, so an edit that fires on any
        mention of the subject (rather than on the subject being asked about) shows up as bleed-over."""
        return [f"{self.edit_statement} {p}" for p in self.neighborhood_prompts]


_CF_FORMATS = {".json": "JSON array, as ROME's counterfact.json", ".jsonl": "JSON Lines"}
_CF_EXPECT = "CounterFact records with 'case_id', 'requested_rewrite' and 'neighborhood_prompts'"
_PROMPT = "a template with exactly one '{}' where the subject goes, e.g. 'The mother tongue of {} is'"


def _counterfact(rec: _Record) -> CounterFactRecord:
    case_id = rec.integer("case_id", "an integer case id")
    rec.where = f"{rec.where} (case_id {case_id})"
    rr = "requested_rewrite"
    prompt = rec.text(f"{rr}.prompt", _PROMPT)
    subject = rec.text(f"{rr}.subject", "a non-empty string (the subject substituted into 'prompt')")
    if prompt.count("{}") != 1:
        raise rec.fail(f"{rr}.prompt", f"has {prompt.count('{}')} '{{}}' placeholders ({prompt!r})", _PROMPT)
    try:
        prompt.format(subject)
    except (IndexError, KeyError, ValueError) as e:
        raise rec.fail(f"{rr}.prompt", f"has other braces ({prompt!r})",
                       _PROMPT + "; write literal braces as '{{' and '}}'") from e
    new = rec.text(f"{rr}.target_new.str", "a non-empty string (the counterfactual answer)")
    true = rec.text(f"{rr}.target_true.str", "a non-empty string (the true answer)")
    if new == true:
        raise rec.fail(f"{rr}.target_new.str", f"equals target_true.str ({true!r})",
                       "a counterfactual target different from the true one")
    return CounterFactRecord(
        case_id=case_id, subject=subject, prompt=prompt, target_new=new, target_true=true,
        relation_id=rec.text(f"{rr}.relation_id", "a string such as 'P103' (or the field left out)",
                             required=False) or "",
        paraphrase_prompts=rec.strings("paraphrase_prompts"),
        neighborhood_prompts=rec.strings("neighborhood_prompts", required=True),
        attribute_prompts=rec.strings("attribute_prompts"),
        generation_prompts=rec.strings("generation_prompts"),
    )


def load_counterfact(path: str | Path) -> list[CounterFactRecord]:
    """CounterFact cases from a JSON array (ROME's ``counterfact.json``) or JSON Lines; case ids must be unique,
    since results are reported and joined per case id."""
    p = _check_path(path, _CF_FORMATS)
    out: list[CounterFactRecord] = []
    seen: dict[int, str] = {}
    for where, raw in _records(p, _CF_EXPECT):
        rec = _Record(p, where, raw)
        r = _counterfact(rec)
        if r.case_id in seen:
            raise rec.fail("case_id", f"is {r.case_id}, already used at {seen[r.case_id]}", "unique case ids")
        seen[r.case_id] = where
        out.append(r)
    return out


# -- sports facts ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SportsFact:
    """An athlete and their sport; ``prompt`` is the cloze prompt whose next word should be ``sport``."""

    athlete: str
    sport: str
    prompt: str
    extra: dict[str, str] = field(default_factory=dict, hash=False)  # the file's other columns, verbatim


_SPORTS_REQUIRED = ("athlete", "sport")


def load_sports_facts(path: str | Path) -> list[SportsFact]:
    """Sports facts from a CSV with a header: required ``athlete`` and ``sport``, optional ``prompt`` (default
    ``"Fact: {athlete} plays the sport of"``, the fact-finding prompt); any other column is kept in ``extra``."""
    p = _check_path(path, {".csv": "CSV with a header row"})
    reader = csv.reader(io.StringIO(_read_text(p), newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise _no_records(p, "a header row with 'athlete' and 'sport' columns, then one row per fact") from None
    except csv.Error as e:
        raise DataError(f"{p} line 1: cannot parse the CSV header ({e})") from e
    for col in _SPORTS_REQUIRED:
        if col not in header:
            raise DataError(f"{p} line 1: column '{col}' is missing from the header {header}; "
                            f"expected columns {list(_SPORTS_REQUIRED)} (and optionally 'prompt')")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{p} line 1: column(s) {dupes} appear more than once in the header; expected unique names")
    out: list[SportsFact] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{p} line {reader.line_num}: cannot parse the CSV row ({e})") from e
        if not row:
            continue  # blank line
        line = reader.line_num
        if len(row) != len(header):
            raise DataError(f"{p} line {line}: row has {len(row)} cells; expected {len(header)} to match the header "
                            f"{header} (quote cells that contain commas)")
        cells = dict(zip(header, (c.strip() for c in row), strict=True))
        for col in _SPORTS_REQUIRED:
            if not cells[col]:
                raise DataError(f"{p} line {line}: column '{col}' is empty; expected a non-empty {col}")
        athlete, sport = cells.pop("athlete"), cells.pop("sport")
        prompt = cells.pop("prompt", "") or f"Fact: {athlete} plays the sport of"
        out.append(SportsFact(athlete=athlete, sport=sport, prompt=prompt, extra=cells))
    if not out:
        raise _no_records(p, "one row per fact after the header")
    return out


def sports_prompts(facts: Iterable[SportsFact]) -> tuple[list[str], list[str]]:
    """``(prompts, answers)`` for :func:`mechun.evaluate.answer_correct`, which puts the space between them."""
    facts = list(facts)
    return [f.prompt for f in facts], [f.sport for f in facts]


# -- prompt files ----------------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file, one per non-empty line, stripped, in file order (any extension).

    Raises :class:`DataFileNotFoundError` for a missing file and :class:`DataError` for a file with no prompts."""
    p = _existing_file(path)
    prompts = [line.strip() for line in _read_text(p).splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{p}: no prompts (the file is empty or blank); expected one prompt per line")
    return prompts


# -- writing ---------------------------------------------------------------------------------------------------------
def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line, written whole or not at all (:func:`mechun.io.atomic_file`)."""
    from mechun.io import atomic_file

    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(dict(r), ensure_ascii=False) + "\n")
    return Path(path)
