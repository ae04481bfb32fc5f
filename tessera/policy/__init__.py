"""Cedar policy evaluation shared by the policy service and `tessera policy test`."""
