"""Registration of a CT to the atlas template: one interface, backends chosen by name.

    from LungAtlasLib.registration import get_registration
    result = get_registration("classical").register(fixed=atlas_ct, moving=patient_ct,
                                                    fixed_mask=..., moving_mask=...)
    result.fixed_to_moving   # resamples moving images onto the fixed grid (ITK resampling direction)
    result.moving_to_fixed   # carries moving-space points (nodules) into fixed space
"""
from .base import RegistrationError, RegistrationResult, Registration, available_registrations, get_registration

__all__ = ["RegistrationError", "RegistrationResult", "Registration", "available_registrations", "get_registration"]
