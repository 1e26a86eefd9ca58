// Empty: the emulator defines the half types in cuda_emu.h.
