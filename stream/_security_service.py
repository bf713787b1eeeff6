"""The gRPC edge for riverlog.v1.Security: who am I, ACLs, quotas (see security.proto)."""

from __future__ import annotations

from typing import Any, TypeVar

import grpc

from ._broker import InvalidRequestError
from ._pb import security_pb2
from ._rpc import guarded, method_handlers, parse
from .security._acl import Acl, AclFilter, Operation, PatternType, Permission, ResourceType
from .security._guard import Guard
from .security._quota import Quota

SECURITY_SERVICE = "riverlog.v1.Security"

E = TypeVar("E", ResourceType, Operation, PatternType, Permission)


def _enum(kind: type[E], pb_enum: Any, number: int, what: str, *, required: bool) -> E | None:
    """Our enum member for a protobuf enum number (same names); None for 0 when optional."""
    if number == 0:
        if required:
            raise InvalidRequestError(f"an ACL needs a {what}")
        return None
    try:
        return kind[pb_enum.Name(number)]
    except (ValueError, KeyError):
        raise InvalidRequestError(f"{what} {number} is not one this broker knows") from None


def _acl(a: security_pb2.Acl) -> Acl:
    resource_type = _enum(
        ResourceType, security_pb2.ResourceType, a.resource_type, "resource type", required=True
    )
    pattern_type = _enum(
        PatternType, security_pb2.PatternType, a.pattern_type, "pattern type", required=False
    )
    operation = _enum(Operation, security_pb2.Operation, a.operation, "operation", required=True)
    permission = _enum(
        Permission, security_pb2.Permission, a.permission, "permission", required=True
    )
    assert resource_type is not None
    assert operation is not None
    assert permission is not None
    return Acl(
        principal=a.principal,
        resource_type=resource_type,
        pattern_type=pattern_type or PatternType.LITERAL,
        name=a.name,
        operation=operation,
        permission=permission,
    )


def _filter(f: security_pb2.AclFilter) -> AclFilter:
    return AclFilter(
        principal=f.principal or None,
        resource_type=_enum(
            ResourceType,
            security_pb2.ResourceType,
            f.resource_type,
            "resource type",
            required=False,
        ),
        pattern_type=_enum(
            PatternType, security_pb2.PatternType, f.pattern_type, "pattern type", required=False
        ),
        name=f.name or None,
        operation=_enum(
            Operation, security_pb2.Operation, f.operation, "operation", required=False
        ),
        permission=_enum(
            Permission, security_pb2.Permission, f.permission, "permission", required=False
        ),
    )


def _acl_pb(a: Acl) -> security_pb2.Acl:
    return security_pb2.Acl(
        principal=a.principal,
        resource_type=security_pb2.ResourceType.Value(a.resource_type.name),
        pattern_type=security_pb2.PatternType.Value(a.pattern_type.name),
        name=a.name,
        operation=security_pb2.Operation.Value(a.operation.name),
        permission=security_pb2.Permission.Value(a.permission.name),
    )


def _quota_pb(q: Quota) -> security_pb2.Quota:
    out = security_pb2.Quota()
    if q.produce_bytes_per_s is not None:
        out.produce_bytes_per_s = q.produce_bytes_per_s
    if q.fetch_bytes_per_s is not None:
        out.fetch_bytes_per_s = q.fetch_bytes_per_s
    return out


class SecurityService:
    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    @guarded
    def WhoAmI(self, raw: bytes, context: grpc.ServicerContext) -> security_pb2.WhoAmIResponse:
        parse(security_pb2.WhoAmIRequest, raw, context)
        return security_pb2.WhoAmIResponse(
            principal=self.guard.principal(),
            super_user=self.guard.is_super_user(),
            acls_enabled=self.guard.authorizer.enabled,
        )

    @guarded
    def ListAcls(self, raw: bytes, context: grpc.ServicerContext) -> security_pb2.ListAclsResponse:
        f = parse(security_pb2.AclFilter, raw, context)
        self.guard.check_cluster(Operation.DESCRIBE)
        return security_pb2.ListAclsResponse(
            acls=[_acl_pb(a) for a in self.guard.authorizer.list(_filter(f))]
        )

    @guarded
    def CreateAcls(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> security_pb2.CreateAclsResponse:
        r = parse(security_pb2.CreateAclsRequest, raw, context)
        self.guard.check_cluster(Operation.ALTER)
        created = self.guard.authorizer.add([_acl(a) for a in r.acls])
        return security_pb2.CreateAclsResponse(created=created)

    @guarded
    def DeleteAcls(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> security_pb2.DeleteAclsResponse:
        f = parse(security_pb2.AclFilter, raw, context)
        self.guard.check_cluster(Operation.ALTER)
        deleted = self.guard.authorizer.remove(_filter(f))
        return security_pb2.DeleteAclsResponse(deleted=[_acl_pb(a) for a in deleted])

    @guarded
    def ListQuotas(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> security_pb2.ListQuotasResponse:
        parse(security_pb2.ListQuotasRequest, raw, context)
        self.guard.check_cluster(Operation.DESCRIBE)
        quotas = self.guard.quotas
        return security_pb2.ListQuotasResponse(
            default_quota=_quota_pb(quotas.default),
            quotas={p: _quota_pb(q) for p, q in quotas.list().items()},
        )

    @guarded
    def SetQuota(self, raw: bytes, context: grpc.ServicerContext) -> security_pb2.SetQuotaResponse:
        r = parse(security_pb2.SetQuotaRequest, raw, context)
        self.guard.check_cluster(Operation.ALTER)
        quotas = self.guard.quotas
        if r.remove:
            if not r.principal:
                raise InvalidRequestError("the default quota cannot be removed; set it instead")
            quotas.remove(r.principal)
            return security_pb2.SetQuotaResponse()
        quota = Quota(
            produce_bytes_per_s=(
                r.quota.produce_bytes_per_s if r.quota.HasField("produce_bytes_per_s") else None
            ),
            fetch_bytes_per_s=(
                r.quota.fetch_bytes_per_s if r.quota.HasField("fetch_bytes_per_s") else None
            ),
        )
        if r.principal:
            quotas.set(r.principal, quota)
        else:
            quotas.set_default(quota)
        return security_pb2.SetQuotaResponse()


def security_handlers(guard: Guard) -> grpc.GenericRpcHandler:
    kinds: dict[str, tuple[str, Any]] = {
        "WhoAmI": ("unary", security_pb2.WhoAmIResponse),
        "ListAcls": ("unary", security_pb2.ListAclsResponse),
        "CreateAcls": ("unary", security_pb2.CreateAclsResponse),
        "DeleteAcls": ("unary", security_pb2.DeleteAclsResponse),
        "ListQuotas": ("unary", security_pb2.ListQuotasResponse),
        "SetQuota": ("unary", security_pb2.SetQuotaResponse),
    }
    return method_handlers(SECURITY_SERVICE, SecurityService(guard), kinds)
