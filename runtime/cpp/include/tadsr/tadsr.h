/*
 * tadsr C API: run a tadsr-mobile ExecuTorch artifact (fused pipeline or encoder + denoiser + decoder) on an
 * image of any size, exactly as the Python runtime (tadsr.runtime.pipeline.MobileSRPipeline) does: reflect pad,
 * fixed tiles, portable seeded noise (Philox4x32-10 + Box-Muller, the manifest's "noise" record), feather blend.
 *
 * Every function returns a tadsr_status; on failure tadsr_last_error() (thread-local) holds a message that
 * names the file, value or limit at fault, and no output buffer has been written. Nothing aborts the process.
 * Not thread-safe per runner: use one runner per thread (runners are independent).
 */
#ifndef TADSR_H
#define TADSR_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define TADSR_API __declspec(dllexport)
#else
#define TADSR_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum tadsr_status {
    TADSR_OK = 0,
    TADSR_ERR_ARGUMENT = 1,  /* null pointer, zero-size image, buffer too small, bad option */
    TADSR_ERR_IO = 2,        /* artifact folder, manifest or model file missing / unreadable */
    TADSR_ERR_MANIFEST = 3,  /* manifest.json malformed, wrong schema / format / graph, unknown noise */
    TADSR_ERR_INTEGRITY = 4, /* a model file does not match its sha256 in the manifest */
    TADSR_ERR_SPEC = 5,      /* the program's inputs / outputs do not match the manifest */
    TADSR_ERR_RUNTIME = 6,   /* ExecuTorch failed to load or execute a program */
    TADSR_ERR_MEMORY = 7     /* allocation failed */
} tadsr_status;

typedef struct tadsr_runner tadsr_runner;

typedef struct tadsr_options {
    int overlap; /* LR pixels shared by neighbouring tiles; clamped to tile - 1; default 16 */
    int blend;   /* 0: feather (default, as the Python runtime), 1: uniform average (upstream) */
} tadsr_options;

/* Defaults: overlap 16, feather blend. */
TADSR_API void tadsr_options_default(tadsr_options* options);

/*
 * Open an artifact: a fused "pipeline" ExecuTorch artifact folder (holding manifest.json), or a folder whose
 * subfolders hold the encoder, denoiser and decoder ExecuTorch artifacts of one precision and tile (a fused
 * pipeline among them is preferred). Reads every manifest, checks every model file against its sha256 and the
 * programs' inputs against the manifests, and loads the programs. options may be NULL.
 */
TADSR_API tadsr_status tadsr_runner_create(const char* artifact_dir, const tadsr_options* options,
                                           tadsr_runner** out);

/* Free a runner (NULL is a no-op). */
TADSR_API void tadsr_runner_free(tadsr_runner* runner);

/* Facts of an open runner: LR tile side, scale factor, 1 if fused, precision string ("fp32", "int8"). */
TADSR_API int tadsr_runner_tile(const tadsr_runner* runner);
TADSR_API int tadsr_runner_scale(const tadsr_runner* runner);
TADSR_API int tadsr_runner_fused(const tadsr_runner* runner);
TADSR_API const char* tadsr_runner_precision(const tadsr_runner* runner);

/*
 * Super-resolve an 8-bit RGB image (rows of width * 3 bytes, no padding) of any size >= 1x1.
 * out must hold (width * scale) * (height * scale) * 3 bytes (out_capacity says how many it holds).
 * Samples map to the model range as the Python runtime: x = (v / 255 - 0.5) / 0.5, and back
 * v = round_half_even(clamp(clamp(y, -1, 1) * 0.5 + 0.5, 0, 1) * 255).
 */
TADSR_API tadsr_status tadsr_upscale_rgb8(tadsr_runner* runner, const uint8_t* rgb, int width, int height,
                                          uint64_t seed, uint8_t* out, size_t out_capacity);

/*
 * The same on planar float32 in [-1, 1]: in is (3, height, width), out (3, height * scale, width * scale);
 * out_capacity counts floats.
 */
TADSR_API tadsr_status tadsr_upscale_f32(tadsr_runner* runner, const float* in, int width, int height,
                                         uint64_t seed, float* out, size_t out_capacity);

/*
 * The portable noise: out[c][i][j] = field(seed, c, y0 + i, x0 + j) for c < channels, i < h, j < w (float32).
 * For checking a port of the generator (Kotlin, Swift) against this one.
 */
TADSR_API tadsr_status tadsr_noise(uint64_t seed, int channels, int h, int w, uint32_t y0, uint32_t x0,
                                   float* out, size_t out_capacity);

/* The message of the last failed call on this thread ("" if none). Valid until the next call on this thread. */
TADSR_API const char* tadsr_last_error(void);

/* Library version string. */
TADSR_API const char* tadsr_version(void);

#ifdef __cplusplus
}
#endif

#endif /* TADSR_H */
