"""Named keys, versions, states and algorithms: domain logic, no wire types."""
