"""Mixer's config kinds (config.istio.io/v1alpha2): attributemanifest, handler, instance, rule.

Istio 1.4's own telemetry and policy configuration loads unchanged. The shapes follow istio/api
policy/v1beta1 (cfg.proto, value_type.proto); older per-adapter and per-template kinds
(``kind: stdio``, ``kind: logentry``) are read as handlers and instances, as Mixer did.
"""

from __future__ import annotations

import dataclasses
import linecache
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field

from mixerhub.adapter import InstanceSpec
from mixerhub.attributes import ValueType
from mixerhub.expression import Expression, ExpressionError, compile_expression
from mixerhub.expression.compile import Generator, inline_code
from mixerhub.snapshot import (
    AttributeBinding,
    BuiltHandler,
    CompiledAction,
    CompiledInstance,
    CompiledRule,
    HeaderOperation,
)
from mixerhub.store.compilation import Compilation, HandlerDeclaration, Ref, resolve
from mixerhub.store.documents import Document
from mixerhub.store.errors import join_path
from mixerhub.store.kinds import Kind
from mixerhub.templates import TEMPLATES, Template, TemplateField, Variety, snake_case
from mixerhub.types import Bag, ExpressionText, Params, expression_text

GROUP = "config.istio.io"
VERSIONS = ("v1alpha2",)


# --- attributemanifest -------------------------------------------------------------------------


class AttributeInfo(Params):
    description: str = ""
    # Checked by the compile step, attribute by attribute, so one bad type hides no other error.
    value_type: str


class AttributeManifestSpec(Params):
    revision: str = ""
    name: str = ""
    attributes: dict[str, AttributeInfo] = Field(default_factory=dict)


def compile_manifest(doc: Document, spec: AttributeManifestSpec, c: Compilation) -> None:
    origin = f"{doc.file}: document {doc.index}"
    for name, info in spec.attributes.items():
        try:
            declared = ValueType.parse(info.value_type)
        except ValueError as e:
            c.error(doc, join_path("spec", "attributes", name, "valueType"), str(e))
            continue
        known = c.attributes.get(name)
        if known is not None and known != declared:
            c.error(
                doc,
                join_path("spec", "attributes", name, "valueType"),
                f"{name!r} is {declared.name} here but {known.name} in {c.attribute_origin[name]}",
            )
            continue
        c.attributes.setdefault(name, declared)
        c.attribute_origin.setdefault(name, origin)


# --- handler -----------------------------------------------------------------------------------


class HandlerSpec(Params):
    compiled_adapter: str = ""
    adapter: str = ""
    params: dict[str, Any] | None = None
    connection: dict[str, Any] | None = None


def compile_handler(doc: Document, spec: HandlerSpec, c: Compilation) -> None:
    problem: tuple[str, str] | None = None
    if spec.adapter or spec.connection is not None:
        field = "spec.adapter" if spec.adapter else "spec.connection"
        problem = field, "out-of-process adapters are not supported; use compiledAdapter"
    elif not spec.compiled_adapter:
        problem = "spec.compiledAdapter", "required field is missing"
    elif spec.compiled_adapter not in c.registry.adapters:
        known = ", ".join(c.registry.adapters)
        problem = (
            "spec.compiledAdapter",
            f"unknown adapter {spec.compiled_adapter!r}; known: {known}",
        )
    if problem is not None:
        c.error(doc, *problem)
        c.mark_broken("handler", doc)
        return
    if not c.claim("handler", doc):
        return
    c.handlers[Ref(doc.name, doc.namespace)] = HandlerDeclaration(
        doc, spec.compiled_adapter, spec.params or {}, f"{doc.name}.{doc.kind}.{doc.namespace}"
    )


# --- instance ----------------------------------------------------------------------------------


class InstanceDocSpec(Params):
    compiled_template: str = ""
    template: str = ""
    params: dict[str, Any] | None = None
    attribute_bindings: dict[str, str] | None = None


def compile_instance(doc: Document, spec: InstanceDocSpec, c: Compilation) -> None:
    template = TEMPLATES.get(spec.compiled_template)
    problem: tuple[str, str] | None = None
    if spec.template:
        problem = (
            "spec.template",
            "out-of-process templates are not supported; use compiledTemplate",
        )
    elif template is None:
        known = ", ".join(TEMPLATES)
        problem = (
            "spec.compiledTemplate",
            (
                f"unknown template {spec.compiled_template!r}; known: {known}"
                if spec.compiled_template
                else "required field is missing"
            ),
        )
    elif spec.attribute_bindings and template.variety is not Variety.ATTRIBUTE_GENERATOR:
        generators = ", ".join(
            t.name for t in TEMPLATES.values() if t.variety is Variety.ATTRIBUTE_GENERATOR
        )
        problem = (
            "spec.attributeBindings",
            f"template {template.name!r} produces no attributes; only attribute-generating"
            f" templates do ({generators})",
        )
    if problem is not None or template is None:
        c.error(doc, *(problem or ("spec.compiledTemplate", "required field is missing")))
        c.mark_broken("instance", doc)
        return
    if not c.claim("instance", doc):
        return
    full_name = f"{doc.name}.{doc.kind}.{doc.namespace}"
    generator = template.variety is Variety.ATTRIBUTE_GENERATOR
    # A generator's inputs are read before its outputs fill the bag: an input such as
    # `source.uid | ""` must not be kept in an entry's memo, where a later instance reading
    # the same expression would see the value from before the bag was filled.
    fields = _FieldCompiler(doc, c, memo=not generator)
    build = fields.message(
        template.fields, template.instance, spec.params or {}, ("spec", "params")
    )
    bindings = _bindings(doc, template, spec.attribute_bindings or {}, fields)
    if fields.failed:
        c.mark_broken("instance", doc)
        return

    c.instances[Ref(doc.name, doc.namespace)] = CompiledInstance(
        full_name,
        template,
        InstanceSpec(full_name, template.name, fields.types),
        InstanceBuilder(build, full_name),
        frozenset(fields.referenced),
        fields.sources,
        bindings,
    )


# `$out.<field>` names a field of an attribute generator's output. `$` is no Go identifier, so
# outside string literals it is spelled as the template's output prefix before compiling.
OUT = "$out."
_OUT_TOKEN = re.compile(r"""("(?:[^"\\\n]|\\.)*"|`[^`]*`|'(?:[^'\\\n]|\\.)*')|\$out\.""")


def _spell_out(source: str, prefix: str) -> str:
    return _OUT_TOKEN.sub(lambda m: m.group(1) or prefix, source)


def _bindings(
    doc: Document,
    template: Template,
    bindings: Mapping[str, Any],
    fields: _FieldCompiler,
) -> tuple[AttributeBinding, ...]:
    """Compile ``attributeBindings``: attribute name -> expression over ``$out.<field>``, typed by
    the template's OutputTemplate and checked against the attribute's manifest type."""
    c = fields.c
    prefix = template.output_prefix
    scope = dict(c.attributes)
    scope.update({prefix + f.name: f.type for f in template.output})
    out: list[AttributeBinding] = []
    for attribute, text in bindings.items():
        path = join_path("spec", "attributeBindings", str(attribute))
        declared = c.attributes.get(str(attribute))
        source = _expression_text(text)
        if declared is None:
            fields._fail(path, f"unknown attribute {attribute!r}: no manifest declares it")
            continue
        if source is None:
            fields._fail(path, f"must be an expression (a string), not {type(text).__name__}")
            continue
        try:
            expr = compile_expression(_spell_out(source, prefix), scope, declared)
        except ExpressionError as e:
            fields._fail(path, f"{str(e).replace(prefix, OUT)} in {source!r}")
            continue
        output_fields = frozenset(n[len(prefix) :] for n in expr.referenced if n.startswith(prefix))
        request = frozenset(n for n in expr.referenced if not n.startswith(prefix))
        fields.referenced |= request
        out.append(
            AttributeBinding(str(attribute), expr.evaluate, source, output_fields, bool(request))
        )
    return tuple(out)


class _FieldCompiler:
    """Compiles an instance's params, one expression per template field, into a builder."""

    def __init__(self, doc: Document, c: Compilation, memo: bool = True) -> None:
        self.doc, self.c = doc, c
        self.memo = memo
        self.failed = False
        self.types: dict[str, ValueType] = {}
        self.sources: dict[str, str] = {}
        self.referenced: set[str] = set()
        # How each field's function was compiled, so report_builder can inline its code.
        self.inline: dict[Evaluator, InlineSource] = {}

    def message(
        self,
        fields: tuple[TemplateField, ...],
        cls: type[Any],
        params: Mapping[str, Any],
        path: tuple[str, ...],
        prefix: str = "",
    ) -> MessageBuilder:
        """A builder (bag, instance name) -> instance of cls; messages nested below get no name."""
        by_name = {f.name: f for f in fields}
        scalars: list[tuple[str, Callable[[Bag], object]]] = []
        maps: list[tuple[str, tuple[tuple[str, Callable[[Bag], object]], ...]]] = []
        messages: list[tuple[str, MessageBuilder]] = []
        for key, value in params.items():
            f = by_name.get(snake_case(str(key)))
            if f is None:
                self._fail(
                    join_path(*path, str(key)),
                    f"no such field in this template; fields: {', '.join(by_name) or 'none'}",
                )
                continue
            field_path = (*path, str(key))
            name = prefix + f.name
            if f.fields:
                if not isinstance(value, dict):
                    self._fail(join_path(*field_path), "must be a mapping of its fields")
                    continue
                sub_cls = _message_class(cls, f.name)
                messages.append(
                    (f.name, self.message(f.fields, sub_cls, value, field_path, name + "."))
                )
            elif f.is_map:
                if not isinstance(value, dict):
                    self._fail(join_path(*field_path), "must be a mapping of name to expression")
                    continue
                entries = []
                for k, text in value.items():
                    ev = self.expression(text, f.type, (*field_path, str(k)), f"{name}.{k}")
                    if ev is not None:
                        entries.append((str(k), ev))
                maps.append((f.name, tuple(entries)))
            else:
                ev = self.expression(value, f.type, field_path, name, f.also)
                if ev is not None:
                    scalars.append((f.name, ev))
        return MessageBuilder(
            cls,
            tuple(scalars),
            tuple(maps),
            tuple(messages),
            named=not prefix,
            memoize=self.memo,
            inline=self.inline,
        )

    def expression(
        self,
        text: object,
        expected: ValueType,
        path: tuple[str, ...],
        type_key: str,
        also: frozenset[ValueType] = frozenset(),
    ) -> Callable[[Bag], object] | None:
        source = _expression_text(text)
        if source is None:
            self._fail(
                join_path(*path), f"must be an expression (a string), not {type(text).__name__}"
            )
            return None
        expr: Expression | None
        try:
            expr = self.c.compile_expression(source, expected)
            compiled_as: ValueType | None = expected
        except ExpressionError as e:
            expr = _also(source, self.c.attributes, also)
            if expr is None:
                self._fail(join_path(*path), f"{e} in {source!r}")
                return None
            compiled_as = None
        self.inline[expr.evaluate] = InlineSource(source, self.c.attributes, compiled_as)
        self.types[type_key] = expr.result_type
        self.sources[type_key] = source
        self.referenced |= expr.referenced
        return expr.evaluate

    def _fail(self, path: str, reason: str) -> None:
        self.failed = True
        self.c.error(self.doc, path, reason)


def _also(
    source: str, attributes: Mapping[str, ValueType], also: frozenset[ValueType]
) -> Expression | None:
    """The expression, if its type is one of the field's other accepted types."""
    if not also:
        return None
    try:
        expr = compile_expression(source, attributes)
    except ExpressionError:
        return None
    return expr if expr.result_type in also else None


def _expression_text(value: object) -> str | None:
    text = expression_text(value)
    return text if isinstance(text, str) and text.strip() else None


def _message_class(instance_cls: type[Any], field_name: str) -> type[Any]:
    for template in TEMPLATES.values():
        if template.instance is instance_cls:
            return template.messages[field_name]
    raise LookupError(f"{instance_cls.__name__} has no message field {field_name}")


Evaluator = Callable[[Bag], object]


@dataclass(frozen=True, slots=True)
class InlineSource:
    """What a field's function was compiled from: report_builder compiles it again as code."""

    source: str
    attributes: Mapping[str, ValueType]
    expected: ValueType | None


class MessageBuilder:
    """Builds one message of an instance (the instance itself, or a message field below it) from
    its compiled field expressions. What it holds is also what ``report_builder`` generates code
    from, so the generic path here and the generated one cannot drift apart in what they read."""

    __slots__ = ("cls", "inline", "maps", "memoize", "messages", "named", "scalars")

    def __init__(
        self,
        cls: type[Any],
        scalars: tuple[tuple[str, Evaluator], ...],
        maps: tuple[tuple[str, tuple[tuple[str, Evaluator], ...]], ...],
        messages: tuple[tuple[str, MessageBuilder], ...],
        named: bool,
        memoize: bool = True,
        inline: Mapping[Evaluator, InlineSource] | None = None,
    ) -> None:
        self.cls, self.scalars, self.maps, self.messages = cls, scalars, maps, messages
        self.named, self.memoize = named, memoize
        self.inline = inline or {}

    def __call__(self, bag: Bag, name: str) -> Any:
        scalars, maps = self.scalars, self.maps
        if not self.memoize or type(bag) is not dict:  # a self-filling bag or a read-only mapping
            values: dict[str, Any] = {f: ev(bag) for f, ev in scalars}
            for f, entries in maps:
                values[f] = {k: ev(bag) for k, ev in entries}
        else:
            # The rules of one entry often evaluate the same expression many times (Istio's
            # four HTTP metrics share 21 dimensions): each result is kept in the entry's own
            # bag, keyed by the compiled function, which no attribute name can collide with.
            memo: dict[Any, Any] = bag
            values = {}
            for f, ev in scalars:
                v = memo.get(ev, _MISSING)
                if v is _MISSING:
                    v = memo[ev] = ev(bag)
                values[f] = v
            for f, entries in maps:
                d = {}
                for k, ev in entries:
                    v = memo.get(ev, _MISSING)
                    if v is _MISSING:
                        v = memo[ev] = ev(bag)
                    d[k] = v
                values[f] = d
        for f, sub in self.messages:
            values[f] = sub(bag, name)
        return self.cls(name, **values) if self.named else self.cls(**values)

    def evaluators(self) -> list[Evaluator]:
        """Every field expression below this message, in the order the generic path reads them."""
        out = [ev for _, ev in self.scalars]
        out += [ev for _, entries in self.maps for _, ev in entries]
        for _, sub in self.messages:
            out += sub.evaluators()
        return out


class InstanceBuilder:
    """``CompiledInstance.build``: the instance's message builder, with the instance's name."""

    __slots__ = ("message", "name")

    def __init__(self, message: MessageBuilder, name: str) -> None:
        self.message, self.name = message, name

    def __call__(self, bag: Bag) -> Any:
        return self.message(bag, self.name)


_MISSING = object()


def _inline_code(generator: Generator, inline: InlineSource) -> str | None:
    """The expression as one Python expression over ``bag``; None when it cannot be."""
    inlined = inline_code(generator, inline.source, inline.attributes, inline.expected)
    return inlined[0] if inlined is not None else None


class InstanceCode:
    """The code constructing instances from the locals their field expressions were evaluated
    into (``local``: compiled expression -> local name). A map field equal to one already
    built (Istio's four HTTP metrics share their 21 dimensions) is built once, in ``prelude``,
    and the instances share it: instances are read-only to handlers."""

    def __init__(
        self,
        namespace: dict[str, Any],
        local: Mapping[Evaluator, str],
        prefix: str = "m",
        recurring: Callable[[type[Any], str], bool] | None = None,
        fixed: Collection[str] = (),
        batched: bool = False,
    ) -> None:
        self.namespace, self.local, self.prefix = namespace, local, prefix
        # recurring(cls, field): whether that map field takes few distinct values from one
        # instance to the next (a metric's dimensions, which become label sets). Such a map is
        # looked up by its values in a dict (named in ``memos``, which the caller makes empty
        # once per batch) rather than built every time: its handlers then see one map per
        # label set, and work out its labels once per run of it. The locals in ``fixed`` hold
        # the same value for the whole batch: they are left out of the key.
        self.recurring, self.fixed = recurring, fixed
        self.memos: list[str] = []
        # ``batched``: the code runs in a loop over a batch (the access-log dispatch). A large
        # map is then copied from a template made once per batch (lines in ``templates``, for
        # the caller to run before the loop, as the memos), holding the ``fixed`` values, and
        # only its other values are stored; and a plain dataclass instance is made by stores
        # into its fields, without its __init__ call.
        self.use_templates = batched
        self.templates: list[str] = []
        self._instances: list[str] = []
        self.prelude: list[str] = []
        self._classes: dict[type[Any], str] = {}
        self._maps: dict[str, str] = {}

    def instance(self, message: MessageBuilder, instance_name: str) -> str:
        cls = self._classes.get(message.cls)
        if cls is None:
            cls = self._classes[message.cls] = f"{message.cls.__name__}_{len(self._classes)}"
            self.namespace[cls] = message.cls
        local = self.local
        fields: dict[str, str] = {}
        fields.update((f, local[ev]) for f, ev in message.scalars)
        for f, entries in message.maps:
            items = "{" + ", ".join(f"{k!r}: {local[ev]}" for k, ev in entries) + "}"
            shared = self._maps.get(items)
            if shared is None:
                shared = self._maps[items] = f"{self.prefix}{len(self._maps)}"
                if self.recurring is not None and self.recurring(message.cls, f):
                    # Keyed by the values' locals: an expression has one type, so equal keys
                    # (1 == True aside, which one expression cannot yield both of) are equal maps.
                    distinct = dict.fromkeys(local[ev] for _, ev in entries)
                    values = [v for v in distinct if v not in self.fixed]
                    memo, key = f"memo_{shared}", f"key_{shared}"
                    self.memos.append(memo)
                    self.prelude += [
                        f"{key} = ({', '.join(values)}{',' if len(values) == 1 else ''})",
                        "try:",
                        f"    {shared} = {memo}.get({key})",
                        "except TypeError:  # a value that cannot be a key (a map): no reuse",
                        f"    {shared} = {key} = None",
                        f"if {shared} is None:",
                        f"    {shared} = {items}",
                        f"    if {key} is not None:",
                        f"        {memo}[{key}] = {shared}",
                    ]
                else:
                    self.prelude += self._map(shared, [(k, local[ev]) for k, ev in entries])
            fields[f] = shared
        fields.update((f, self.instance(sub, instance_name)) for f, sub in message.messages)
        if self.use_templates and _settable(message.cls):
            assigned = self._assigned(cls, message, instance_name, fields)
            if assigned is not None:
                return assigned
        args = [repr(instance_name)] if message.named else []
        args += _arguments(message.cls, fields, skip=1 if message.named else 0)
        return f"{cls}({', '.join(args)})"

    def _assigned(
        self, cls: str, message: MessageBuilder, instance_name: str, fields: Mapping[str, str]
    ) -> str | None:
        """The instance made in ``prelude`` by object.__new__ and a store per field, what its
        dataclass __init__ does without the call (a Python frame, over a thousand instructions
        an instance, five an Istio access-log entry); returns the local holding it. None when
        a field without a default has no value: the constructor's call then says so."""
        declared = dataclasses.fields(message.cls)
        if not set(fields) <= {f.name for f in declared}:
            return None
        stores: list[tuple[str, str]] = []
        for i, field in enumerate(declared):
            code = fields.get(field.name)
            if i == 0 and message.named:
                code = repr(instance_name)
            elif code is None:
                if (
                    field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING
                ):
                    return None
                code = self._default(cls, field)
            stores.append((field.name, code))
        name = f"{self.prefix}i{len(self._instances)}"
        self._instances.append(name)
        self.namespace["_new"] = object.__new__
        lines = [f"{name} = _new({cls})", *(f"{name}.{f} = {code}" for f, code in stores)]
        self.prelude += lines
        return name

    def _default(self, cls: str, field: dataclasses.Field[Any]) -> str:
        if field.default_factory is dict:
            return "{}"
        if field.default_factory is list:
            return "[]"
        constant = f"_{cls}_{field.name}"
        if field.default_factory is not dataclasses.MISSING:
            self.namespace[constant] = field.default_factory
            return f"{constant}()"
        self.namespace[constant] = field.default  # shared, as __init__ shares it
        return constant

    def _map(self, name: str, items: Sequence[tuple[str, str]]) -> list[str]:
        """Lines making map ``name`` from its (key, local) items."""
        display = "{" + ", ".join(f"{k!r}: {v}" for k, v in items) + "}"
        keys = {k for k, _ in items}
        if not self.use_templates or len(items) <= _DISPLAY_CHUNK or len(keys) < len(items):
            return [f"{name} = {display}"]
        # Python builds a display of more than _DISPLAY_CHUNK items in chunks merged one into
        # the next, resizing as it goes (an Istio access log's 39 variables cost about 10,000
        # instructions that way); a copy of a dict is one block copy, and a store into a key
        # it has does not resize.
        template = f"tpl_{name}"
        fixed = self.fixed
        values = ", ".join(f"{k!r}: {v if v in fixed else 'None'}" for k, v in items)
        self.templates.append(f"{template} = {{{values}}}")
        stores = [f"{name}[{k!r}] = {v}" for k, v in items if v not in fixed]
        return [f"{name} = {template}.copy()", *stores]


def _settable(cls: type[Any]) -> bool:
    """Whether an instance of ``cls`` is what object.__new__ and a store per field make: a
    plain dataclass whose generated __init__ only stores its fields (or their defaults)."""
    if not dataclasses.is_dataclass(cls) or cls.__new__ is not object.__new__:
        return False
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.init or params.frozen or hasattr(cls, "__post_init__"):
        return False
    return all(f.init for f in dataclasses.fields(cls))


# How many items CPython 3.11 puts in one dict display's build before it merges (its compiler's
# STACK_USE_GUIDELINE of 30 stack slots, two a pair).
_DISPLAY_CHUNK = 15


def _arguments(cls: type[Any], fields: Mapping[str, str], skip: int) -> list[str]:
    """A constructor's arguments: positionally while the fields come in the class's order
    (a keyword costs about as much again, per instance), then by keyword."""
    order = (
        [f.name for f in dataclasses.fields(cls)][skip:] if dataclasses.is_dataclass(cls) else []
    )
    args: list[str] = []
    rest = dict(fields)
    for name in order:
        if name not in rest:
            break
        args.append(rest.pop(name))
    return args + [f"{f}={code}" for f, code in rest.items()]


@dataclass(frozen=True, slots=True)
class GeneratedBuild:
    """One function that builds several instances from one bag, with its source for debugging."""

    function: Callable[[Bag], tuple[Any, ...]]
    source: str
    filename: str


def report_builder(label: str, builds: Sequence[object]) -> GeneratedBuild | None:
    """One generated function building all of ``builds`` (InstanceBuilders) from one bag: each
    distinct field expression is evaluated once, into a local, its code inlined (the expression
    compiler's own output, without a call per expression), and the instances are constructed from
    those locals in straight-line code. It raises EvaluationError as soon as any expression fails,
    before building anything: the caller then falls back to the instances' own builders, which
    skip just the instances that cannot be built. None when some build is not an InstanceBuilder
    (nothing to generate from) or must not share results (attribute generators).
    """
    if not builds or not all(isinstance(b, InstanceBuilder) and b.message.memoize for b in builds):
        return None
    instances = [b for b in builds if isinstance(b, InstanceBuilder)]
    # One code generator for every expression: its temporaries and constants get names unique
    # across them, and its namespace (helpers, constants) is the generated function's globals.
    generator = Generator(label)
    namespace = generator.namespace
    local: dict[Evaluator, str] = {}  # one local per distinct compiled expression
    lines = [f"def build(bag):  # {label}", "    try:"]
    for instance in instances:
        for ev in instance.message.evaluators():
            if ev in local:
                continue
            name = local[ev] = f"v{len(local)}"
            inline = instance.message.inline.get(ev)
            code = _inline_code(generator, inline) if inline is not None else None
            if code is None:
                namespace[f"e_{name}"] = ev
                code = f"e_{name}(bag)"
            comment = repr(inline.source[:80]) if inline is not None else repr(ev)
            lines.append(f"        {name} = {code}  # {comment}")
    lines += [
        "    except _EvaluationError:",
        "        raise",
        "    except Exception as e:  # a missing attribute (KeyError) too: the caller falls back",
        "        raise _evaluation_failed(e) from e",
    ]
    construction = InstanceCode(namespace, local)
    built = [construction.instance(i.message, i.name) for i in instances]
    lines += [f"    {line}" for line in construction.prelude]
    lines.append("    return (")
    lines += [f"        {code}," for code in built]
    lines.append("    )")
    source = "\n".join(lines) + "\n"
    filename = f"<report {label}>"
    exec(compile(source, filename, "exec"), namespace)
    # Tracebacks and debuggers show the generated lines, as they would a module's.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return GeneratedBuild(namespace["build"], source, filename)


# --- rule --------------------------------------------------------------------------------------


class ActionSpec(Params):
    handler: str
    instances: list[str] = Field(default_factory=list)
    name: str = ""


class HeaderOperationSpec(Params):
    name: str
    values: list[ExpressionText] = Field(default_factory=list)
    operation: Literal["REPLACE", "REMOVE", "APPEND"] = "REPLACE"


class RuleSpec(Params):
    match: ExpressionText = ""
    actions: list[ActionSpec] = Field(default_factory=list)
    request_header_operations: list[HeaderOperationSpec] = Field(default_factory=list)
    response_header_operations: list[HeaderOperationSpec] = Field(default_factory=list)


def compile_rule(doc: Document, spec: RuleSpec, c: Compilation) -> None:
    if not c.claim("rule", doc):
        return
    failed = False

    def fail(path: str, reason: str) -> None:
        nonlocal failed
        failed = True
        c.error(doc, path, reason)

    def expression(source: str, expected: ValueType, path: str) -> Expression | None:
        try:
            return compile_expression(source, c.attributes, expected)
        except ExpressionError as e:
            fail(path, f"{e} in {source!r}")
            return None

    match = expression(spec.match, ValueType.BOOL, "spec.match") if spec.match.strip() else None
    referenced: set[str] = set(match.referenced) if match else set()
    planned: list[tuple[str, Ref, tuple[Ref, ...]]] = []
    action_names: set[str] = set()
    for i, action in enumerate(spec.actions):
        path = ("spec", "actions", i)
        if action.name and action.name in action_names:
            fail(join_path(*path, "name"), f"duplicate action name {action.name!r} in this rule")
        action_names.add(action.name)
        handler_ref, why = resolve(
            action.handler, doc.namespace, c.handlers, lambda h: ("handler", h.document.kind)
        )
        declaration = c.handlers.get(handler_ref) if handler_ref else None
        if handler_ref is None or declaration is None:
            if c.is_broken("handler", action.handler, doc.namespace):
                failed = True  # its own error says why; a second one here would be noise
            else:
                fail(join_path(*path, "handler"), f"unknown handler: {why}")
        if not action.instances:
            fail(join_path(*path, "instances"), "an action needs at least one instance")
        refs: list[Ref] = []
        for j, name in enumerate(action.instances):
            ref, why = resolve(
                name, doc.namespace, c.instances, lambda i: ("instance", i.template.name)
            )
            if ref is None:
                if c.is_broken("instance", name, doc.namespace):
                    failed = True
                else:
                    fail(join_path(*path, "instances", j), f"unknown instance: {why}")
                continue
            instance = c.instances[ref]
            referenced |= instance.referenced
            refs.append(ref)
            if declaration is not None and not c.registry.supports(
                declaration.adapter, instance.template.name
            ):
                supported = ", ".join(c.registry.adapters[declaration.adapter].templates)
                fail(
                    join_path(*path, "instances", j),
                    f"handler {declaration.display} (adapter {declaration.adapter}) does not"
                    f" support template {instance.template.name!r}; it supports {supported}",
                )
        if handler_ref is not None and declaration is not None:
            planned.append((action.name, handler_ref, tuple(refs)))

    def operations(specs: list[HeaderOperationSpec], field: str) -> tuple[HeaderOperation, ...]:
        out = []
        for i, op in enumerate(specs):
            values = []
            for j, text in enumerate(op.values):
                expr = expression(text, ValueType.STRING, join_path("spec", field, i, "values", j))
                if expr is not None:
                    values.append(expr)
                    referenced.update(expr.referenced)
            if op.operation == "REMOVE" and op.values:
                fail(join_path("spec", field, i, "values"), "REMOVE takes no values")
            out.append(HeaderOperation(op.name, tuple(values), op.operation))
        return tuple(out)

    request_ops = operations(spec.request_header_operations, "requestHeaderOperations")
    response_ops = operations(spec.response_header_operations, "responseHeaderOperations")
    if failed:
        return
    for _, handler_ref, routed in planned:
        specs = c.handler_instances.setdefault(handler_ref, {})
        for ref in routed:
            specs[c.instances[ref].name] = c.instances[ref].spec
    instances = dict(c.instances)
    full_name = f"{doc.name}.{doc.kind}.{doc.namespace}"

    def link(built: Mapping[Ref, BuiltHandler]) -> CompiledRule:
        actions = tuple(
            CompiledAction(name, built[h], tuple(instances[r] for r in action_refs))
            for name, h, action_refs in planned
        )
        return CompiledRule(
            full_name,
            doc.namespace,
            match,
            actions,
            request_ops,
            response_ops,
            frozenset(referenced),
        )

    c.rule_plans.append(link)


# --- the kinds, and the older per-adapter / per-template spellings ----------------------------

ATTRIBUTE_MANIFEST = Kind(
    GROUP, VERSIONS, "attributemanifest", AttributeManifestSpec, 0, compile_manifest
)
HANDLER = Kind(GROUP, VERSIONS, "handler", HandlerSpec, 10, compile_handler)
INSTANCE = Kind(GROUP, VERSIONS, "instance", InstanceDocSpec, 20, compile_instance)
RULE = Kind(GROUP, VERSIONS, "rule", RuleSpec, 30, compile_rule)
KINDS = (ATTRIBUTE_MANIFEST, HANDLER, INSTANCE, RULE)


def legacy_kind(doc: Document, adapters: Mapping[str, object]) -> tuple[Document, Kind[Any]] | None:
    """``kind: stdio`` (an adapter's name) is a handler; ``kind: logentry`` (a template's) an
    instance: the spellings of Istio before 1.1. The document keeps its kind for display
    (``handler.stdio.istio-system``); None when the kind is neither."""
    if doc.api_version.rpartition("/")[0] != GROUP:
        return None
    if doc.kind in adapters:
        spec = {"compiledAdapter": doc.kind, "params": dict(doc.spec)}
        return replace(doc, spec=spec), HANDLER
    if doc.kind in TEMPLATES:
        spec = {"compiledTemplate": doc.kind, "params": dict(doc.spec)}
        return replace(doc, spec=spec), INSTANCE
    return None
