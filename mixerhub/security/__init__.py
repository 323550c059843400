"""Istio's security resources: RequestAuthentication (JWT) and AuthorizationPolicy."""

# Policies here apply mesh-wide, as in Istio's default mesh config (rootNamespace).
ROOT_NAMESPACE = "istio-system"
