/* reverse plugin: reverses the bytes of the text. */
#include <stdlib.h>
#include <string.h>

const char *plugin_describe(void)
{
    return "reverse the text";
}

char *plugin_transform(const char *input)
{
    size_t n = strlen(input);
    char *out = malloc(n + 1);
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++)
        out[i] = input[n - 1 - i];
    out[n] = '\0';
    return out;
}
