"""istio.v1.auth messages (istio/api security/v1alpha1/ca.proto), built at import time.

No published Python package carries them, so the file descriptor is written out here and the
classes come from protobuf's message factory. The field numbers are the wire contract: csr = 1,
validity_duration = 3 (field 2 was removed upstream), metadata = 4; cert_chain = 1.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

PACKAGE = "istio.v1.auth"
SERVICE = f"{PACKAGE}.IstioCertificateService"
CREATE_CERTIFICATE = f"/{SERVICE}/CreateCertificate"

_F = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(
        name="security/v1alpha1/ca.proto",
        package=PACKAGE,
        syntax="proto3",
        dependency=[struct_pb2.DESCRIPTOR.name],
    )
    f.options.go_package = "istio.io/api/security/v1alpha1"
    request = f.message_type.add(name="IstioCertificateRequest")
    request.field.add(name="csr", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    request.field.add(
        name="validity_duration", number=3, type=_F.TYPE_INT64, label=_F.LABEL_OPTIONAL
    )
    request.field.add(
        name="metadata",
        number=4,
        type=_F.TYPE_MESSAGE,
        label=_F.LABEL_OPTIONAL,
        type_name=".google.protobuf.Struct",
    )
    response = f.message_type.add(name="IstioCertificateResponse")
    response.field.add(name="cert_chain", number=1, type=_F.TYPE_STRING, label=_F.LABEL_REPEATED)
    service = f.service.add(name="IstioCertificateService")
    service.method.add(
        name="CreateCertificate",
        input_type=f".{PACKAGE}.IstioCertificateRequest",
        output_type=f".{PACKAGE}.IstioCertificateResponse",
    )
    return f


def _register() -> Any:
    pool = descriptor_pool.Default()
    proto = _file()
    try:
        # Already there when another module (or istio's own generated code) loaded it first.
        return pool.FindFileByName(proto.name)
    except KeyError:
        pass
    # struct_pb2 is imported above, so the default pool already has the dependency.
    pool.Add(proto)
    return pool.FindFileByName(proto.name)


_DESCRIPTOR = _register()

# The classes are dynamic: typed as Any for mypy, real protobuf messages at run time.
IstioCertificateRequest: Any = message_factory.GetMessageClass(
    _DESCRIPTOR.message_types_by_name["IstioCertificateRequest"]
)
IstioCertificateResponse: Any = message_factory.GetMessageClass(
    _DESCRIPTOR.message_types_by_name["IstioCertificateResponse"]
)
