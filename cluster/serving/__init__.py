"""The pure side of the Serve deployments: their options, the ingress's keys and limits, engine measurements."""
