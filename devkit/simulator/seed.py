"""The codes and campaigns a simulator starts with: from a JSON file or the built-in set."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_CODES_PER_CAMPAIGN = 5000


class SeedCampaign(BaseModel):
    """A campaign and the SCM field keys its template defines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=1)
    name: str = ""
    scm_fields: list[str]


class SeedCode(BaseModel):
    """One code: its identifiers, product and SCM field values."""

    model_config = ConfigDict(extra="forbid")

    extended_id: str = Field(min_length=1)
    serial_number: str | None = None
    campaign: int
    product: str | None = None
    scm_data: dict[str, str] = {}


class Seed(BaseModel):
    """A whole seed file."""

    model_config = ConfigDict(extra="forbid")

    campaigns: list[SeedCampaign]
    codes: list[SeedCode]

    @model_validator(mode="after")
    def _consistent(self) -> Seed:
        campaigns = {campaign.id: campaign for campaign in self.campaigns}
        seen: set[str] = set()
        for code in self.codes:
            if code.campaign not in campaigns:
                raise ValueError(f"code {code.extended_id} names unknown campaign {code.campaign}")
            if code.extended_id in seen:
                raise ValueError(f"extended_id {code.extended_id} appears twice")
            seen.add(code.extended_id)
            unknown = set(code.scm_data) - set(campaigns[code.campaign].scm_fields)
            if unknown:
                raise ValueError(
                    f"code {code.extended_id} has fields {sorted(unknown)} "
                    f"that campaign {code.campaign} does not define"
                )
        return self


def load_seed(path: Path) -> Seed:
    """Read and check a seed file (JSON)."""
    return Seed.model_validate_json(path.read_bytes())


def default_seed(codes_per_campaign: int = DEFAULT_CODES_PER_CAMPAIGN) -> Seed:
    """Two campaigns with predictable codes (docs/scantrust-api.md, "The simulator").

    Campaign 11: extended ids `11X000000`.., serial numbers `SN11-000000`.., RFID tags
    `E2801160000000`.. and 24 codes per case `CASE-00000`...
    Campaign 12: extended ids `12X000000`.., serial numbers `SN12-000000`.., 240 codes
    per pallet `PALLET-0000`...
    """
    campaigns = [
        SeedCampaign(
            id=11,
            name="Simulated campaign A",
            scm_fields=[
                "production_date",
                "intended_market",
                "batch_number",
                "rfid",
                "case_number",
            ],
        ),
        SeedCampaign(
            id=12,
            name="Simulated campaign B",
            scm_fields=["production_date", "intended_market", "lot", "expiry_date", "pallet_sscc"],
        ),
    ]
    codes = [
        SeedCode(
            extended_id=f"11X{i:06d}",
            serial_number=f"SN11-{i:06d}",
            campaign=11,
            product="SKU-A",
            scm_data={"rfid": f"E2801160{i:06d}", "case_number": f"CASE-{i // 24:05d}"},
        )
        for i in range(codes_per_campaign)
    ] + [
        SeedCode(
            extended_id=f"12X{i:06d}",
            serial_number=f"SN12-{i:06d}",
            campaign=12,
            product="SKU-B",
            scm_data={"pallet_sscc": f"PALLET-{i // 240:04d}"},
        )
        for i in range(codes_per_campaign)
    ]
    return Seed(campaigns=campaigns, codes=codes)
