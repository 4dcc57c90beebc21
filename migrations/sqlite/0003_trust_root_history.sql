-- Every trust root a product has had, so a device holding version N can be handed the chain
-- N+1, N+2, ... and verify each step with the keys it already trusts.
CREATE TABLE trust_roots (
    product TEXT NOT NULL,
    version BIGINT NOT NULL,
    envelope TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (product, version)
);
