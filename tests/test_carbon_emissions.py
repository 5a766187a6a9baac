"""Operational and embodied emissions, SCI, against the seed's own figures."""

from __future__ import annotations

import pytest

from sidecar.carbon.emissions import (
    DEFAULT_HOST_EMBODIED_KG,
    DEFAULT_LIFETIME_YEARS,
    G_PER_KWH_PER_LB_PER_MWH,
    UNKNOWN_GPU_EMBODIED_KG,
    EmbodiedModel,
    OperationalEmissions,
    gpu_embodied_default,
    joules_to_kwh,
    operational_grams,
    sci_per_unit,
)

KWH_J = 3.6e6
# BLOOM deployment on GCP us-central1 (seed-facts.md).
DEPLOY_KWH = 914.0
DEPLOY_G_PER_KWH = 394.0
DEPLOY_REQUESTS = 230_768
# BLOOM training (seed-facts.md).
BLOOM_GPU_HOURS = 1_082_990


class TestOperational:
    def test_seed_deployment_total(self) -> None:
        """914 kWh at 394 g/kWh is 360.1 kg CO2e."""
        grams = operational_grams(DEPLOY_KWH * KWH_J, DEPLOY_G_PER_KWH)
        assert grams == pytest.approx(360_116.0)
        assert round(grams / 1000, 1) == 360.1

    def test_seed_deployment_per_day(self) -> None:
        """Over about 18 days that is about 20 kg a day."""
        assert round(operational_grams(DEPLOY_KWH * KWH_J, DEPLOY_G_PER_KWH) / 18 / 1000) == 20

    def test_seed_per_request(self) -> None:
        """All-in energy per request is 3.96 Wh (14.3 kJ) and 1.56 g over 230,768 requests."""
        energy_j = DEPLOY_KWH * KWH_J / DEPLOY_REQUESTS
        assert round(energy_j / 3600, 2) == 3.96
        assert round(energy_j / 1000, 1) == 14.3
        assert round(operational_grams(energy_j, DEPLOY_G_PER_KWH), 2) == 1.56

    def test_pue_multiplies(self) -> None:
        """PUE scales the grams, not the energy: 1 kWh at 100 g/kWh and PUE 1.5 is 150 g."""
        assert operational_grams(KWH_J, 100.0, pue=1.5) == pytest.approx(150.0)

    def test_pue_below_one_rejected(self) -> None:
        """A PUE below 1 is impossible and refused."""
        with pytest.raises(ValueError, match="PUE"):
            operational_grams(KWH_J, 100.0, pue=0.9)

    def test_joules_to_kwh(self) -> None:
        """3.6 MJ is one kWh."""
        assert joules_to_kwh(7.2e6) == 2.0

    def test_pound_conversion(self) -> None:
        """1 lb/MWh is 0.45359 g/kWh (seed), exactly 0.45359237."""
        assert round(G_PER_KWH_PER_LB_PER_MWH, 5) == 0.45359

    def test_codecarbon_electricitymaps_vector(self) -> None:
        """CodeCarbon's fixture: 10 kWh at 58.765 g/kWh is 0.58765 kg."""
        assert operational_grams(10 * KWH_J, 58.765) / 1000 == pytest.approx(0.58765)

    def test_accumulator_uses_each_increment_intensity(self) -> None:
        """Energy is booked at the intensity in force when it was used, not the latest."""
        acc = OperationalEmissions(pue=1.1)
        first = acc.add(KWH_J, 100.0)
        acc.add(KWH_J, 300.0)
        assert first == pytest.approx(110.0)
        assert acc.grams == pytest.approx(440.0)
        assert acc.energy_j == 2 * KWH_J


class TestEmbodied:
    def bloom(self) -> EmbodiedModel:
        return EmbodiedModel(
            gpu_embodied_kg=150.0,
            gpus=1,
            host_embodied_kg=2500.0,
            host_share=1 / 8,
            lifetime_years=6.0,
            utilisation=0.85,
        )

    def test_bloom_gpus(self) -> None:
        """150 kg per A100 over 6 years at 85 % use: 3,636 kg for 1,082,990 GPU-hours."""
        kg = self.bloom().gpu_grams_per_second * BLOOM_GPU_HOURS * 3600 / 1000
        assert round(kg) == 3636

    def test_bloom_servers(self) -> None:
        """2,500 kg per 8-GPU server, same amortisation: 7,575 kg (7.57 t)."""
        kg = self.bloom().host_grams_per_second * BLOOM_GPU_HOURS * 3600 / 1000
        assert round(kg) == 7575

    def test_bloom_total(self) -> None:
        """GPUs and servers together are BLOOM's 11.2 t embodied."""
        tonnes = self.bloom().grams(BLOOM_GPU_HOURS * 3600) / 1e6
        assert round(tonnes, 1) == 11.2

    def test_sci_worked_example(self) -> None:
        """SCI: 1,000 kg embodied, 4-year life, reserved 1 h gives 28.5 g."""
        model = EmbodiedModel(
            gpu_embodied_kg=1000.0, gpus=1, host_embodied_kg=0.0, host_share=0.0, lifetime_years=4
        )
        assert round(model.grams(3600.0), 1) == 28.5

    def test_host_shared_by_gpu_count(self) -> None:
        """Two GPUs of an 8-GPU host carry a quarter of its embodied emissions."""
        model = EmbodiedModel.for_gpus("NVIDIA A100-SXM4-40GB", 2)
        assert model.host_share == 0.25
        assert model.total_embodied_kg == pytest.approx(2 * 150 + 2500 / 4)

    def test_defaults(self) -> None:
        """Host 2,500 kg (BLOOM) and a 4-year life unless overridden."""
        model = EmbodiedModel.for_gpus("NVIDIA H100 80GB HBM3", 8)
        assert model.host_embodied_kg == DEFAULT_HOST_EMBODIED_KG == 2500.0
        assert model.lifetime_years == DEFAULT_LIFETIME_YEARS == 4.0
        assert model.utilisation == 1.0

    def test_overrides(self) -> None:
        """--gpu-embodied-kg, --host-embodied-kg and --lifetime-years win over defaults."""
        model = EmbodiedModel.for_gpus(
            "NVIDIA H100", 1, gpu_embodied_kg=200, host_embodied_kg=5700, lifetime_years=3
        )
        assert (model.gpu_embodied_kg, model.host_embodied_kg, model.lifetime_years) == (
            200,
            5700,
            3,
        )

    def test_grams_grow_linearly(self) -> None:
        """Embodied grams accrue in proportion to reserved time."""
        model = EmbodiedModel.for_gpus("NVIDIA L4", 1)
        assert model.grams(7200.0) == pytest.approx(2 * model.grams(3600.0))
        assert model.grams(0.0) == 0.0

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"gpu_embodied_kg": -1.0, "gpus": 1},
            {"gpu_embodied_kg": 1.0, "gpus": -1},
            {"gpu_embodied_kg": 1.0, "gpus": 1, "lifetime_years": 0.0},
            {"gpu_embodied_kg": 1.0, "gpus": 1, "utilisation": 0.0},
            {"gpu_embodied_kg": 1.0, "gpus": 1, "utilisation": 1.5},
        ],
    )
    def test_invalid_inputs_rejected(self, kwargs: dict[str, float]) -> None:
        """Negative emissions, no lifetime or a use share outside (0, 1] are refused."""
        with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
            EmbodiedModel(**kwargs)  # type: ignore[arg-type]

    def test_negative_duration_rejected(self) -> None:
        """Time reserved cannot be negative."""
        with pytest.raises(ValueError, match="negative"):
            EmbodiedModel.for_gpus("A100", 1).grams(-1.0)


class TestGpuDefaults:
    @pytest.mark.parametrize(
        ("name", "kg"),
        [
            ("NVIDIA A100-SXM4-40GB", 150.0),
            ("NVIDIA A100 80GB PCIe", 150.0),
            ("NVIDIA H100 80GB HBM3", 164.0),
            ("NVIDIA H100 NVL", 164.0),
            ("NVIDIA H200", 164.0),
            ("NVIDIA A10G", 114.0),
            ("NVIDIA A10", 114.0),
            ("NVIDIA L40S", 111.0),
            ("NVIDIA L40", 111.0),
            ("NVIDIA L4", 53.0),
            ("Tesla V100-SXM2-16GB", 148.0),
            ("Tesla T4", 99.0),
        ],
    )
    def test_by_model_name(self, name: str, kg: float) -> None:
        """Model names as NVML reports them pick their figure; longer names win over prefixes."""
        assert gpu_embodied_default(name).kg == kg

    def test_h100_is_hgx_board_over_eight(self) -> None:
        """H100's 164 kg is NVIDIA's 1,312 kg HGX H100 board footprint over 8 GPUs."""
        entry = gpu_embodied_default("h100")
        assert entry.kg == 1312 / 8
        assert "1,312" in entry.source

    def test_unknown_gpu_gets_documented_default(self) -> None:
        """An unknown GPU gets the documented default, never zero."""
        entry = gpu_embodied_default("Tesla K80")
        assert entry.kg == UNKNOWN_GPU_EMBODIED_KG > 0
        assert "unknown" in entry.source

    def test_every_default_names_its_source(self) -> None:
        """Each default says where it comes from or that it is an estimate."""
        for name in ("A100", "H100", "H200", "A10G", "L40S", "L4", "V100", "T4"):
            assert gpu_embodied_default(name).source


class TestSci:
    def test_seed_per_request(self) -> None:
        """SCI per request of the seed deployment without embodied is its 1.56 g."""
        sci = sci_per_unit(DEPLOY_KWH, DEPLOY_G_PER_KWH, 1.0, 0.0, DEPLOY_REQUESTS)
        assert round(sci, 2) == 1.56

    def test_embodied_and_pue_add(self) -> None:
        """SCI = (E x PUE x I + M) / R."""
        assert sci_per_unit(2.0, 100.0, 1.5, 100.0, 4) == pytest.approx((2 * 1.5 * 100 + 100) / 4)

    def test_per_thousand_tokens(self) -> None:
        """Per 1,000 tokens is the same formula with thousands of tokens as the unit."""
        per_token = sci_per_unit(1.0, 400.0, 1.0, 0.0, 10_000)
        per_kilotoken = sci_per_unit(1.0, 400.0, 1.0, 0.0, 10)
        assert per_kilotoken == pytest.approx(1000 * per_token)

    def test_no_units_rejected(self) -> None:
        """SCI over zero requests is undefined and refused, not reported as zero."""
        with pytest.raises(ValueError, match="functional unit"):
            sci_per_unit(1.0, 400.0, 1.0, 0.0, 0)
