"""What the Helm chart ships that is generated from the code: dashboards, the args schema."""
