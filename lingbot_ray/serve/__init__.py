"""The Ray Serve application: deployments, router, app builder, and the ingress's helpers."""
